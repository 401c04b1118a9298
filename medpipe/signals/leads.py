"""Lead names as the store records them: the standard 12-lead names whatever the file calls them.

Files name the same lead differently (DICOM "Lead I (Einthoven)", EDF "ECG I" or "EKG II-REF", WFDB "i" or
"AVR"); records are matched to the store's lead set by these canonical names, so a DICOM ECG and a WFDB record
of the same leads land in one store. Names that are not one of the 12 standard leads (MIT-BIH's "MLII", "V"
without a number, respiration) are kept as written, trimmed.
"""

from __future__ import annotations

import re

STANDARD_LEADS = ("I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6")
_BY_KEY = {name.casefold(): name for name in STANDARD_LEADS}
# an optional "Lead"/"ECG"/"EKG" prefix, the lead, then an optional reference suffix ("-REF", "-Ref") and/or a
# parenthesised remark ("(Einthoven)")
_PATTERN = re.compile(r"^(?:(?:lead|ecg|ekg)[\s_:-]*)?(?P<lead>[a-z0-9]+)(?:[\s_-]*ref)?(?:\s*\(.*\))?$", re.I)


def canonical_lead(name: str) -> str:
    """The standard name of a 12-lead ECG lead ("Lead I (Einthoven)" -> "I", "AVR" -> "aVR", "ECG V1" -> "V1"),
    else the name trimmed."""
    text = " ".join(str(name).split())
    match = _PATTERN.match(text)
    if match:
        standard = _BY_KEY.get(match.group("lead").casefold())
        if standard:
            return standard
    return text
