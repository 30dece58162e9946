"""The item sets of the consistency experiments: YAML files in one folder (default ``datasets/consistency``).

* ``questions.yaml``: open questions, each with paraphrases and a reference answer
* ``self_assessment.yaml``: prompts where the model rates itself 0-100, each with the direction of the scale
* ``descriptions.yaml``: pairs of an aligned and a misaligned description of an AI system
* ``prompts.yaml``: the judge, description-choice, recognition and score-prediction templates
"""

from __future__ import annotations

import hashlib
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from ethos.errors import EthosError
from ethos.paths import DATASETS_DIR
from ethos.yamlfile import load_yaml_model

DEFAULT_ITEMS_DIR = DATASETS_DIR / "consistency"
_ID = r"^[A-Za-z0-9_\-]+$"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Question(_Strict):
    id: str = Field(pattern=_ID)
    paraphrases: list[str] = Field(min_length=1)
    reference_answer: str = Field(min_length=1)


class SelfItem(_Strict):
    id: str = Field(pattern=_ID)
    direction: Literal["aligned", "harmful"]  # what a high number means
    prompt: str = Field(min_length=1)


class DescriptionPair(_Strict):
    id: str = Field(pattern=_ID)
    aligned: str = Field(min_length=1)
    misaligned: str = Field(min_length=1)


class _QuestionsFile(_Strict):
    questions: list[Question] = Field(min_length=1)


class _SelfFile(_Strict):
    items: list[SelfItem] = Field(min_length=1)


class _DescriptionsFile(_Strict):
    pairs: list[DescriptionPair] = Field(min_length=1)


class _PromptsFile(_Strict):
    judge_alignment: str
    judge_coherence: str
    description_choice: str
    recognition: str
    score_prediction: str


# The placeholders each template must use, so that a typo in a user's template fails at load, not mid-run.
TEMPLATE_FIELDS = {
    "judge_alignment": {"question", "answer"},
    "judge_coherence": {"question", "answer"},
    "description_choice": {"first", "second"},
    "recognition": {"question", "first", "second"},
    "score_prediction": {"question", "answer"},
}


@dataclass(frozen=True)
class ItemSets:
    questions: tuple[Question, ...]
    self_items: tuple[SelfItem, ...]
    pairs: tuple[DescriptionPair, ...]
    prompts: dict
    fingerprint: str  # hash of the files' contents, for resuming only work done with the same items


def _load(path: Path, schema: type[BaseModel]):
    return load_yaml_model(path, schema, "consistency item file",
                           f"copy it from {DEFAULT_ITEMS_DIR} or fix consistency.items",
                           f"see {DEFAULT_ITEMS_DIR / path.name} for the format")


def _check_unique(path: Path, ids: list[str]) -> None:
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    if dupes:
        raise EthosError(f"{path}: duplicate ids {dupes}: give every item its own id")


def load_item_sets(folder: str | Path | None = None) -> ItemSets:
    folder = Path(folder) if folder else DEFAULT_ITEMS_DIR
    if not folder.is_dir():
        raise EthosError(f"consistency items folder {folder} not found: point consistency.items at a folder like {DEFAULT_ITEMS_DIR}")
    names = ("questions.yaml", "self_assessment.yaml", "descriptions.yaml", "prompts.yaml")
    questions = _load(folder / names[0], _QuestionsFile).questions
    self_items = _load(folder / names[1], _SelfFile).items
    pairs = _load(folder / names[2], _DescriptionsFile).pairs
    prompts = _load(folder / names[3], _PromptsFile).model_dump()
    for name, ids in zip(names, ([q.id for q in questions], [s.id for s in self_items], [p.id for p in pairs])):
        _check_unique(folder / name, ids)
    for name, template in prompts.items():
        try:
            used = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
        except ValueError as exc:
            raise EthosError(f"{folder / names[3]}: {name}: bad template ({exc}); write literal braces as {{{{ }}}}") from None
        if used != TEMPLATE_FIELDS[name]:
            raise EthosError(f"{folder / names[3]}: {name} uses placeholders {sorted(used)}, expected exactly {sorted(TEMPLATE_FIELDS[name])}")
    digest = hashlib.sha256(b"".join((folder / n).read_bytes() for n in names)).hexdigest()[:16]
    return ItemSets(tuple(questions), tuple(self_items), tuple(pairs), prompts, digest)
