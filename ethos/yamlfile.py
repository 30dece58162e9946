"""Reading the project's declarative YAML files (recipes, constitutions, taxonomy, item sets) with one-line errors."""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import BaseModel, ValidationError

from .errors import EthosError


class YamlSyntaxError(EthosError):
    """The file exists but is not YAML; ``detail`` is the parser's message on one line."""

    def __init__(self, what: str, path: Path, detail: str):
        self.detail = detail
        super().__init__(f"{what} {path} is not valid YAML: {detail}")


def read_yaml(path: str | Path, what: str, missing_fix: str) -> object:
    """Parse ``path``. A missing file names ``what`` and ``missing_fix``; a syntax error names the place."""
    path = Path(path)
    try:
        text = path.read_text()
    except (FileNotFoundError, IsADirectoryError):
        raise EthosError(f"{what} {path} not found: {missing_fix}") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise YamlSyntaxError(what, path, " ".join(str(exc).split())[:200]) from None


def validation_summary(exc: ValidationError) -> str:
    """The first problem with its YAML path, and how many there are: 'principles.0.id: Field required (2 problem(s))'."""
    errors = exc.errors()
    where = ".".join(str(p) for p in errors[0]["loc"]) or "(top level)"
    return f"{where}: {errors[0]['msg']} ({len(errors)} problem(s))"


def load_yaml_model(path: str | Path, schema: type[BaseModel], what: str, missing_fix: str, format_hint: str):
    """Read and validate one YAML file against ``schema``; every failure is one line ending in ``format_hint``."""
    raw = read_yaml(path, what, missing_fix)
    try:
        return schema.model_validate(raw)
    except ValidationError as exc:
        raise EthosError(f"{what} {Path(path).name}: {validation_summary(exc)}; {format_hint}") from None
