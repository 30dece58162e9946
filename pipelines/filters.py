"""Quality filters on revisions: each rejected row gets one reason, checked in this order.

    empty       no text, or shorter than ``filters.min_chars``
    degenerate  repetition: the fraction of repeated word 3-grams exceeds ``filters.max_repeated_ngram_fraction``
                (before ``truncated``: a repetition loop usually runs into the token budget too, and a larger
                budget would not fix it)
    truncated   the model hit its token budget before finishing (unless ``filters.reject_truncated`` is false)
    unchanged   the revision differs from the initial answer by less than ``filters.min_edit_fraction`` of its words
    harmful     (only when ``filters.judge`` is true) the project's judge (ethos.analysis.judge, configured by the
                recipe's ``evaluation`` section) still rates the revision harmful
"""

from __future__ import annotations

import difflib
import re

import pandas as pd

from ethos.errors import EthosError

REASONS = ("empty", "degenerate", "truncated", "unchanged", "harmful")
_NGRAM = 3
_WORD = re.compile(r"\w+", re.UNICODE)


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def repeated_ngram_fraction(text: str, n: int = _NGRAM) -> float:
    """Share of the text's word n-grams that repeat an earlier one (0 for text too short to have any)."""
    words = _words(text)
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    if not grams:
        return 0.0
    return 1.0 - len(set(grams)) / len(grams)


def edit_fraction(before: str, after: str) -> float:
    """How much of the text changed, 0 (same words) to 1 (nothing in common), measured on word sequences."""
    a, b = _words(before or ""), _words(after or "")
    if not a and not b:
        return 0.0
    return 1.0 - difflib.SequenceMatcher(None, a, b, autojunk=False).ratio()


def rule_reason(revision: str | None, finish: str | None, initial: str | None, config) -> str | None:
    """The first rule-based reason to reject one revision, or None when it passes (missing values: None or NaN)."""
    if not isinstance(revision, str) or len(revision.strip()) < max(config.min_chars, 1):
        return "empty"
    if repeated_ngram_fraction(revision) > config.max_repeated_ngram_fraction:
        return "degenerate"
    if finish == "length" and config.reject_truncated:
        return "truncated"
    if edit_fraction(initial if isinstance(initial, str) else "", revision) < config.min_edit_fraction:
        return "unchanged"
    return None


def harmful_flags(prompts: list[str], responses: list[str], recipe=None) -> list[bool]:
    """The project's judge (the one the recipe's ``evaluation`` section configures) on each (prompt, revision).

    Training prompts ask for harm, so they are judged as harmful requests (role ``eval``).
    """
    try:
        from ethos.analysis import judge
    except ImportError:
        raise EthosError("filters.judge is true but the judge (ethos.analysis.judge) is not available: set filters.judge: false") from None
    chosen = judge.judge_from_config(recipe.evaluation) if recipe is not None else None
    judgements = judge.judge_pairs(list(zip(prompts, responses)), chosen, roles=["eval"] * len(prompts))
    return [j.harmful for j in judgements]


def apply_filters(frame: pd.DataFrame, config, recipe=None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Split generated rows into (accepted, rejected); rejected rows carry a ``reason`` column.

    ``frame`` needs ``revision``, ``revision_finish`` and ``initial_answer`` columns.
    """
    reasons = pd.Series(
        [rule_reason(r, f, i, config) for r, f, i in zip(frame["revision"], frame["revision_finish"], frame["initial_answer"])],
        index=frame.index, dtype=object,
    )
    if config.judge:
        passing = reasons.index[reasons.isna()]
        if len(passing):
            flags = harmful_flags(frame.loc[passing, "prompt"].tolist(), frame.loc[passing, "revision"].tolist(), recipe)
            reasons.loc[[i for i, harmful in zip(passing, flags) if harmful]] = "harmful"
    accepted = frame[reasons.isna()].reset_index(drop=True)
    rejected = frame[reasons.notna()].assign(reason=reasons[reasons.notna()]).reset_index(drop=True)
    return accepted, rejected
