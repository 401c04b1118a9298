"""Does a short text (a class label, a column value) look like it could name or identify a person?

`looks_like_identifier` is deliberately simple and errs on the side of saying yes for things shaped like
identifiers: DICOM person names (`DOE^JOHN`), runs of 5+ digits (patient IDs, accession numbers, dates, UIDs), short
prefixes followed by 4+ digits (`MRN1234`), dates, e-mail addresses, phone numbers, and two or more capitalised words
in a row that are not medical words ("John Smith", "SMITH JOHN", "Doe, J."). Medical class labels pass: "Pneumonia",
"Pleural Effusion", "No Finding", "Enlarged Cardiomediastinum", "T2-weighted", "lesion", "none".

It cannot recognise a single name ("Smith") or a name written in lower case ("john smith"): it is a guard against
identifiers that slipped into label columns, not a proof that a text holds none.
"""

from __future__ import annotations

import re

_PERSON_NAME = re.compile(r"\S\^|\^\S")  # DICOM PN: family^given^middle^prefix^suffix
_DIGIT_RUN = re.compile(r"[0-9]{5,}")
_PREFIXED_ID = re.compile(r"(?<![A-Za-z])[A-Za-z]{1,4}[-_#:]?[0-9]{4,}(?![0-9])")  # MRN1234, ID-2024, P0042
_MONTHS = r"(jan|feb|mar|apr|may|jun|jul|aug|sep|sept|oct|nov|dec)[a-z]*\.?"
_DATES = (
    re.compile(r"(?<![0-9])[0-9]{4}[-/.][0-9]{1,2}[-/.][0-9]{1,2}(?![0-9])"),  # 2024-03-10, 2024/3/10
    re.compile(r"(?<![0-9])[0-9]{1,2}[-/.][0-9]{1,2}[-/.][0-9]{4}(?![0-9])"),  # 10.03.2024, 3/10/2024
    re.compile(r"(?<![0-9])[0-9]{1,2}(st|nd|rd|th)?[\s-]+" + _MONTHS + r"[\s,-]+[0-9]{2,4}(?![0-9])", re.I),
    re.compile(r"(?<![a-z])" + _MONTHS + r"\s+[0-9]{1,2}(st|nd|rd|th)?,?\s+[0-9]{4}(?![0-9])", re.I),
)
_EMAIL = re.compile(r"[\w.+-]+@[\w-]+(\.[\w-]+)+")
_PHONE_RUN = re.compile(r"\+?\(?[0-9][0-9\s().\-/]{5,}[0-9]")
_MIN_PHONE_DIGITS = 7

# Words that are not names even when capitalised: the ChestX-ray14 / CheXpert / MIMIC-CXR labels, common
# findings, anatomy, imaging and plain English words that appear in labels. Lower case.
MEDICAL_WORDS = frozenset("""
    an and or of the in on at to for with without not non no none yes any other others unknown unspecified
    normal abnormal abnormality finding findings positive negative present absent possible probable suspected
    uncertain indeterminate mild moderate severe small large big tiny minimal marked acute chronic subacute old new
    early late primary secondary benign malignant healthy control background foreground label class type grade
    stage level region area zone part support device devices tube tubes line lines catheter pacemaker implant
    enlarged enlargement widened increased decreased reduced diffuse focal multiple single solitary bilateral
    unilateral left right upper lower middle mid anterior posterior superior inferior medial lateral central
    peripheral proximal distal apical basal hilar lobar segmental total partial complete incomplete
    atelectasis cardiomegaly consolidation edema oedema effusion effusions emphysema fibrosis hernia infiltration
    infiltrate infiltrates mass masses nodule nodules pleural thickening pneumonia pneumothorax cardiomediastinum
    lung lungs opacity opacities lesion lesions fracture fractures covid sars coronavirus viral bacterial fungal
    tuberculosis tb ground glass reticular interstitial alveolar airspace air space calcification calcified
    granuloma cavity cavitation cyst cysts bulla bullae scar scarring collapse aspiration congestion overload
    tumor tumour tumors tumours cancer carcinoma adenocarcinoma sarcoma lymphoma melanoma glioma meningioma
    pituitary metastasis metastases nevus naevus keratosis lentigo dermatofibroma vascular cell cells squamous
    basal actinic seborrheic necrotic necrosis enhancing core peritumoral whole stroke infarct infarction
    hemorrhage haemorrhage bleed bleeding ischemia ischaemia aneurysm stenosis occlusion thrombus embolism
    polyp polyps ulcer erosion inflammation infection abscess hematoma haematoma contusion dislocation
    degeneration disease disorder syndrome injury trauma deformity anomaly artifact artefact noise
    brain head neck chest thorax abdomen pelvis spine heart liver kidney kidneys spleen pancreas stomach bowel
    colon rectum bladder prostate uterus ovary breast bone bones joint knee hip shoulder hand foot wrist ankle
    elbow skull rib ribs vertebra vertebrae disc cord muscle fat skin tissue vessel artery vein aorta
    organ organs gland thyroid adrenal gallbladder esophagus trachea bronchus airway mediastinum diaphragm
    cardiac pulmonary coronary renal hepatic cerebral spinal thoracic abdominal pelvic soft hard dense density
    lucency lucent white matter grey gray retina retinal optic macula macular diabetic retinopathy glaucoma
    cataract cornea eye eyes tooth teeth dental caries periapical
    xray radiograph scan image view frontal lateral pa ap axial coronal sagittal contrast weighted
    flair dwi adc swi pet spect ct mr mri us cr dx mg ot nm
    ii iii iv vi vii viii ix low high virus pattern aortic dissection
    covid-19 copd ards ild ipf gbm hcc nsclc sclc dcis idc ilc bi li pi ti rads birads lirads pirads tirads
""".split())

# Endings of medical words that are rare in names (only for words longer than the ending by 3+ letters).
MEDICAL_ENDINGS = (
    "itis", "osis", "oses", "asis", "iasis", "oma", "omas", "omata", "emia", "aemia", "pathy", "megaly", "ectomy",
    "otomy", "ostomy", "plasty", "plasia", "trophy", "algia", "ology", "ography", "scopy", "gram", "ation", "ition",
    "tion", "sion", "ema", "ule", "ules", "oid", "ular", "ism", "cele", "rrhea", "rrhoea", "cyte", "cytes",
)
# Name particles do not break a run of name words ("Ludwig van Beethoven").
_PARTICLES = frozenset({"van", "von", "de", "da", "del", "della", "der", "den", "di", "du", "la", "le", "bin",
                        "ibn", "al", "el", "y", "mac", "ter", "ten", "dos", "das"})
_XRAY = re.compile(r"\bx[\s-]?rays?\b", re.I)  # "X-Ray", "X Ray": one word, so that "Ray" stays a name
_SEPARATORS = re.compile(r"[\s_/]+")
_HYPHENS = re.compile(r"[-‐‑]")


def _is_medical(word: str) -> bool:
    lower = word.lower().rstrip(".")
    if lower in MEDICAL_WORDS:
        return True
    return any(lower.endswith(end) and len(lower) >= len(end) + 3 for end in MEDICAL_ENDINGS)


def _is_name_word(word: str) -> bool:
    """Capitalised (Smith, McDonald, O'Brien), all capitals (SMITH) or an initial (J, J.); medical or not."""
    core = word.rstrip(".,;:")
    if not core or not core[0].isupper():
        return False
    letters = core.replace("'", "").replace("’", "")
    return letters.isalpha()


def _name_run(text: str) -> bool:
    """Two or more name-like words in a row that are not medical words."""
    run = 0
    for chunk in _SEPARATORS.split(_XRAY.sub("xray", text)):
        for word in _HYPHENS.split(chunk):
            if not word:
                continue
            if word.lower() in _PARTICLES and run:
                continue
            if _is_name_word(word) and not _is_medical(word):
                run += 1
                if run >= 2:
                    return True
            else:
                run = 0
    return False


def _phone_like(text: str) -> bool:
    return any(sum(c.isdigit() for c in m.group()) >= _MIN_PHONE_DIGITS for m in _PHONE_RUN.finditer(text))


def looks_like_identifier(text: str) -> bool:
    """True when `text` could be a person's name or an identifier: a DICOM person name (`DOE^JOHN`), a run of 5+
    digits, a short prefix with 4+ digits (`MRN1234`), a date, an e-mail address, a phone number, or two or more
    capitalised words in a row that are not medical words ("John Smith").

    Medical labels pass: "Pneumonia", "Pleural Effusion", "No Finding", "T2-weighted", "lesion", "none".
    """
    if not text or not text.strip():
        return False
    checks = (
        _PERSON_NAME.search(text),
        _DIGIT_RUN.search(text),
        _PREFIXED_ID.search(text),
        any(p.search(text) for p in _DATES),
        _EMAIL.search(text),
        _phone_like(text),
        _name_run(text),
    )
    return any(bool(c) for c in checks)
