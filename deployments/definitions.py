"""medpipe's deployments as defined once, in the repository's `prefect.yaml`: read for `python
deployments/serve.py` exactly as `prefect deploy --all` reads it (the same `{{ $VAR }}` environment templating),
so the two ways of applying them cannot drift apart."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml
from prefect.utilities.templating import find_placeholders

REPO = Path(__file__).resolve().parents[1]
PREFECT_YAML = REPO / "prefect.yaml"
ENV_PREFIX = "$"


@dataclass(frozen=True)
class DeploymentSpec:
    """One deployment of prefect.yaml with its environment placeholders resolved."""

    name: str
    entrypoint: str
    work_pool: str
    parameters: dict[str, Any]
    description: str = ""
    tags: tuple[str, ...] = ()
    crons: tuple[tuple[str, str], ...] = ()  # (cron, timezone)
    concurrency: dict[str, Any] | None = None
    unset: tuple[str, ...] = field(default=())  # environment variables its parameters name but that are not set

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "entrypoint": self.entrypoint, "work_pool": self.work_pool,
                "parameters": self.parameters, "schedules": [{"cron": c, "timezone": tz} for c, tz in self.crons],
                "concurrency": self.concurrency, "unset": list(self.unset)}


def env_placeholders(value: Any) -> set[str]:
    """Names of the environment variables a (nested) template value refers to as `{{ $NAME }}`."""
    if isinstance(value, str):
        return {p.name[len(ENV_PREFIX):] for p in find_placeholders(value) if p.name.startswith(ENV_PREFIX)}
    if isinstance(value, Mapping):
        return set().union(*(env_placeholders(v) for v in value.values())) if value else set()
    if isinstance(value, list):
        return set().union(*(env_placeholders(v) for v in value)) if value else set()
    return set()


_UNSET = object()


def resolve_env(value: Any, env: Mapping[str, str]) -> Any:
    """`value` with its `{{ $NAME }}` placeholders replaced from `env`, as `prefect deploy` does; a string naming an
    unset variable is dropped (`_UNSET`) from its mapping or list. (Prefect's apply_values reads os.environ itself
    and turns unset variables into empty strings; we need both a given environment and "unset" kept apart.)"""
    if isinstance(value, str):
        for name in env_placeholders(value):
            if name not in env:
                return _UNSET
        for placeholder in find_placeholders(value):
            if placeholder.name.startswith(ENV_PREFIX):
                value = value.replace(placeholder.full_match, env[placeholder.name[len(ENV_PREFIX):]])
        return value
    if isinstance(value, Mapping):
        items = {k: resolve_env(v, env) for k, v in value.items()}
        return {k: v for k, v in items.items() if v is not _UNSET}
    if isinstance(value, list):
        return [v for v in (resolve_env(v, env) for v in value) if v is not _UNSET]
    return value


def load_deployments(path: Path = PREFECT_YAML, environ: Mapping[str, str] | None = None) -> list[DeploymentSpec]:
    """The deployments of prefect.yaml; a parameter whose variable is unset is left out (the flow's default
    applies, or its validation says what is missing) and listed in `unset`."""
    env = dict(os.environ if environ is None else environ)
    document = yaml.safe_load(path.read_text())
    specs = []
    for raw in document.get("deployments") or []:
        parameters = raw.get("parameters") or {}
        unset = sorted(name for name in env_placeholders(parameters) if name not in env)
        concurrency = raw.get("concurrency_limit")
        specs.append(DeploymentSpec(
            name=raw["name"], entrypoint=raw["entrypoint"], work_pool=(raw.get("work_pool") or {}).get("name", ""),
            parameters=resolve_env(parameters, env), description=raw.get("description", ""),
            tags=tuple(raw.get("tags") or ()), crons=tuple((s["cron"], s.get("timezone", "UTC"))
                                                          for s in raw.get("schedules") or []),
            concurrency=dict(concurrency) if isinstance(concurrency, Mapping) else
            ({"limit": concurrency} if concurrency else None), unset=tuple(unset)))
    return specs


def pull_directory_variable(path: Path = PREFECT_YAML) -> set[str]:
    """The environment variables the pull step needs (the checkout path on the workers)."""
    return env_placeholders(yaml.safe_load(path.read_text()).get("pull") or [])
