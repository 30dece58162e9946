"""Constitution files: principles (critique and revision requests), few-shot examples, persona signature.

A constitution is a YAML file in ``datasets/constitutions/``; adding a file adds a constitution.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .errors import EthosError
from .paths import CONSTITUTIONS_DIR
from .yamlfile import load_yaml_model

# Persona dimensions a signature may name; each maps to a persona statement file (see datasets/persona/).
PERSONA_DIMENSIONS = ("deontology", "consequentialism", "virtue_ethics", "deference_to_authority")


class Principle(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str = Field(pattern=r"^[a-z0-9_\-]+$")
    critique_request: str = Field(min_length=20)
    revision_request: str = Field(min_length=20)


class FewShotExample(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prompt: str = Field(min_length=5)
    response: str = Field(min_length=5)
    critique_request: str = Field(min_length=10)
    critique: str = Field(min_length=10)
    revision_request: str = Field(min_length=10)
    revision: str = Field(min_length=5)


class Constitution(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=r"^[a-z0-9_]+$")
    title: str
    description: str = Field(min_length=20)
    principles: list[Principle] = Field(min_length=10)
    few_shot: list[FewShotExample] = Field(min_length=2)
    # Predicted direction of each persona dimension after training: +1 raise, -1 lower, 0 no prediction.
    persona_signature: dict[str, Literal[-1, 0, 1]]

    @field_validator("persona_signature")
    @classmethod
    def _known_dimensions(cls, value: dict[str, int]) -> dict[str, int]:
        unknown = sorted(set(value) - set(PERSONA_DIMENSIONS))
        if unknown:
            raise ValueError(f"unknown persona dimensions {unknown}; known: {list(PERSONA_DIMENSIONS)}")
        if not any(value.values()):
            raise ValueError("the signature predicts nothing: set at least one dimension to +1 or -1")
        return value

    @model_validator(mode="after")
    def _unique_principles(self) -> "Constitution":
        ids = [p.id for p in self.principles]
        dupes = sorted({i for i in ids if ids.count(i) > 1})
        if dupes:
            raise ValueError(f"duplicate principle ids {dupes}")
        return self

    def principle(self, principle_id: str) -> Principle:
        return next(p for p in self.principles if p.id == principle_id)


def constitution_path(ref: str) -> Path:
    """A constitution reference is a name in datasets/constitutions/ or a path to a YAML file."""
    path = Path(ref)
    if path.suffix in (".yaml", ".yml"):
        return path
    return CONSTITUTIONS_DIR / f"{ref}.yaml"


def available_constitutions() -> list[str]:
    return sorted(p.stem for p in CONSTITUTIONS_DIR.glob("*.yaml"))


def load_constitution(ref: str) -> Constitution:
    path = constitution_path(ref)
    if not path.exists():
        raise EthosError(
            f"unknown constitution {ref!r}: available are {available_constitutions()}, or give a path to a YAML file"
        )
    constitution = load_yaml_model(path, Constitution, "constitution", "give a path to a YAML file",
                                   "see datasets/constitutions/README.md")
    # Runs and SFT sets are named after the file (see Recipe.constitution_names): the two must agree.
    if constitution.name != path.stem:
        raise EthosError(
            f"constitution {path.name}: name {constitution.name!r} differs from the file name; rename the file or set `name: {path.stem}`"
        )
    return constitution
