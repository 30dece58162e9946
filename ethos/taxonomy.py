"""The safety taxonomy: categories, the narrow set, and each source's label mapping."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .errors import EthosError
from .paths import DATASETS_DIR
from .yamlfile import read_yaml

DEFAULT_TAXONOMY = DATASETS_DIR / "taxonomy.yaml"
IDENTITY_MAPPING = "taxonomy"  # a source whose labels already are taxonomy category names


@dataclass(frozen=True)
class Taxonomy:
    categories: dict[str, str]
    narrow: tuple[str, ...]
    mappings: dict[str, dict[str, str | None]] = field(default_factory=dict)

    @property
    def held_out(self) -> tuple[str, ...]:
        return tuple(c for c in self.categories if c not in self.narrow)

    def map_label(self, mapping: str, label: str | None) -> str | None:
        """Map a source label into the taxonomy; None means 'dropped on purpose' or 'no label'."""
        if label is None or label == "":
            return None
        if label in self.categories:
            return label
        if mapping == IDENTITY_MAPPING:
            raise EthosError(f"unknown category {label!r}: use one of {sorted(self.categories)} or a taxonomy mapping")
        table = self.mappings.get(mapping)
        if table is None:
            raise EthosError(
                f"no taxonomy mapping named {mapping!r}: add `mappings: {{{mapping}: {{...}}}}` to the taxonomy "
                f"or set the source's `label_map` to one of {sorted(self.mappings)}"
            )
        if label not in table:
            raise EthosError(
                f"source label {label!r} has no entry in taxonomy mapping {mapping!r}: add it (value null to drop it)"
            )
        return table[label]


def load_taxonomy(path: str | Path | None = None) -> Taxonomy:
    path = Path(path) if path else DEFAULT_TAXONOMY
    raw = read_yaml(path, "taxonomy", "point `taxonomy:` at a YAML file like datasets/taxonomy.yaml")
    if not isinstance(raw, dict) or not isinstance(raw.get("categories"), dict) or not raw["categories"]:
        raise EthosError(f"taxonomy {path}: needs a non-empty `categories:` mapping of name to description")
    categories = {str(k): str(v) for k, v in raw["categories"].items()}
    narrow = tuple(raw.get("narrow") or ())
    unknown = [c for c in narrow if c not in categories]
    if unknown:
        raise EthosError(f"taxonomy {path}: narrow categories {unknown} are not in `categories`")
    mappings = {}
    for name, table in (raw.get("mappings") or {}).items():
        bad = sorted({v for v in table.values() if v is not None and v not in categories})
        if bad:
            raise EthosError(f"taxonomy {path}: mapping {name!r} targets unknown categories {bad}")
        mappings[str(name)] = {str(k): v for k, v in table.items()}
    return Taxonomy(categories=categories, narrow=narrow, mappings=mappings)
