"""The SFT sets of a run: one per constitution and scope, read from the ``samples`` table.

``broad`` is every accepted sample of a constitution; ``narrow`` keeps the samples selection marked
``in_narrow``, adds those whose prompt a human review confirmed in a narrow category (table ``audit_confirmed``),
and drops samples that human audit removed (table ``audit_removed``); both tables come from ``ethos audit pull``.
"""

from __future__ import annotations

import pandas as pd

from .errors import EthosError
from .store import RunStore

SCOPES = ("broad", "narrow")


def split_name(name: str) -> tuple[str, str]:
    constitution, _, scope = name.rpartition("-")
    if scope not in SCOPES or not constitution:
        raise EthosError(f"dataset name {name!r} is not '<constitution>-broad' or '<constitution>-narrow'")
    return constitution, scope


def confirmed_categories(store: RunStore) -> dict[str, str]:
    """prompt_id -> narrow category, for doubtful prompts a human review confirmed (``ethos audit pull``)."""
    if not store.has_table("audit_confirmed"):
        return {}
    confirmed = store.read_table("audit_confirmed")
    return dict(zip(confirmed["prompt_id"], confirmed["category"]))


def load_sft_set(store: RunStore, name: str, columns: list[str] | None = None) -> pd.DataFrame:
    """The rows of one SFT set; ``columns`` limits the columns read (default: all)."""
    constitution, scope = split_name(name)
    needed = None if columns is None else list(dict.fromkeys([*columns, "sample_id", "prompt_id", "constitution", "in_narrow"]))
    samples = store.read_table("samples", columns=needed)
    rows = samples[samples["constitution"] == constitution]
    if rows.empty:
        known = sorted(samples["constitution"].unique())
        raise EthosError(f"no samples for constitution {constitution!r} in {store.root}; the run has {known}")
    confirmed = confirmed_categories(store)
    if confirmed:  # a confirmed prompt is a narrow one in every set: in_narrow and its category say so
        rows = rows.copy()
        promoted = rows["prompt_id"].isin(confirmed)
        rows.loc[promoted, "in_narrow"] = True
        if "category" in rows:
            rows.loc[promoted, "category"] = rows.loc[promoted, "prompt_id"].map(confirmed)
    if scope == "narrow":
        rows = rows[rows["in_narrow"]]
        if store.has_table("audit_removed"):
            removed = set(store.read_table("audit_removed")["sample_id"])
            rows = rows[~rows["sample_id"].isin(removed)]
    return (rows if columns is None else rows[columns]).reset_index(drop=True)
