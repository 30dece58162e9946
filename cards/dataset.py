"""The dataset card of a run: every fact read from the run folder (tables, verification.json, the recipe)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from ethos.constitutions import load_constitution
from ethos.models import EMBEDDED, EMBEDDED_HUB_ID
from ethos.store import RunStore

from .render import compose, fmt, render_body, signature_text

REASON_MEANINGS = {
    "empty": "the revision is empty or shorter than `min_chars`",
    "truncated": "generation stopped at `max_new_tokens` mid-answer",
    "degenerate": "repeated n-grams exceed `max_repeated_ngram_fraction`",
    "unchanged": "the revision differs from the initial answer by less than `min_edit_fraction`",
    "harmful": "the judge still rated the revision harmful (`judge: true`)",
}
# The select stage's decisions (analysis/select.py), as the card explains them.
SELECTION_MEANINGS = {
    "exact": "the same text as an evaluation or over-refusal prompt",
    "normalized": "the same text as an evaluation prompt after normalisation",
    "ngram": "word-shingle Jaccard to an evaluation prompt at or above `max_ngram_jaccard`",
    "embedding": "embedding cosine to an evaluation prompt at or above `max_cosine`",
    "duplicate": "the same normalised text as another training prompt",
    "narrow_confidence": "its category was voted with confidence below `narrow_min_confidence`",
    "heldout_vote": "the labelled prompts of other sources vote its source label into a held-out category",
    "heldout_exact": "the same text as a held-out training prompt",
    "heldout_normalized": "the same normalised text as a held-out training prompt",
    "heldout_ngram": "a near-duplicate (word shingles) of a held-out training prompt",
    "heldout_embedding": "a near-duplicate (embedding) of a held-out training prompt",
}
_LOCAL_SUFFIXES = {".csv", ".jsonl", ".json", ".parquet", ".txt"}


@dataclass(frozen=True)
class DataConfig:
    """One configuration of the dataset repo: a parquet file loadable with ``load_dataset(repo, name)``."""

    name: str
    path: str  # in the repo
    what: str
    rows: int


def is_hub_id(uri: str) -> bool:
    return bool(re.fullmatch(r"[A-Za-z0-9][\w.\-]*/[\w.\-]+", uri)) and Path(uri).suffix.lower() not in _LOCAL_SUFFIXES


def public_uri(uri: str) -> str:
    """A source as it may appear in a public card: Hub ids and URLs as they are, local files by name only."""
    return uri if "://" in uri or is_hub_id(uri) else Path(uri).name


def size_category(rows: int) -> str:
    for limit, label in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M"),
                         (10_000_000, "1M<n<10M")):
        if rows < limit:
            return label
    return "10M<n<100M"


def constitution_fact(recipe, ref: str) -> dict:
    """A constitution as the cards show it; ``ref`` is a name or a YAML path relative to the recipe."""
    c = load_constitution(str(recipe.resolve_path(ref)) if ref.endswith((".yaml", ".yml")) else ref)
    return {
        "name": c.name, "title": c.title, "description": " ".join(c.description.split()),
        "persona_signature": dict(c.persona_signature), "signature": signature_text(c.persona_signature),
        "principles": [p.model_dump() for p in c.principles],
    }


def constitution_facts(recipe) -> list[dict]:
    return [constitution_fact(recipe, ref) for ref in recipe.constitutions]


def read_verification(store: RunStore) -> dict | None:
    path = store.root / "verification.json"
    return json.loads(path.read_text()) if path.exists() else None


def _generation_facts(recipe, samples: pd.DataFrame) -> dict:
    params = []
    for raw in sorted(samples["generation_params"].dropna().unique()):
        try:
            params.append(json.dumps(json.loads(raw), sort_keys=True))
        except (TypeError, json.JSONDecodeError):
            params.append(str(raw))
    models = sorted(samples["model_id"].dropna().unique())
    embedded = recipe.model.name == EMBEDDED or any(str(m).startswith(EMBEDDED_HUB_ID) for m in models)
    return {"models": models, "params": sorted(set(params)), "backend": recipe.generation.backend, "embedded": embedded}


def _filter_facts(recipe, samples: pd.DataFrame, rejected: pd.DataFrame | None) -> dict:
    counts = rejected["reason"].value_counts() if rejected is not None else pd.Series(dtype=int)
    reasons = [{"reason": r, "meaning": meaning, "count": int(counts.get(r, 0))} for r, meaning in REASON_MEANINGS.items()]
    reasons += [{"reason": r, "meaning": "", "count": int(n)} for r, n in counts.items() if r not in REASON_MEANINGS]
    per_constitution = []
    for name in sorted(samples["constitution"].unique()):
        n_rejected = 0 if rejected is None else int((rejected["constitution"] == name).sum())
        per_constitution.append({"constitution": name, "accepted": int((samples["constitution"] == name).sum()),
                                 "rejected": n_rejected})
    return {"settings": recipe.filters.model_dump(mode="json"), "reasons": reasons, "per_constitution": per_constitution}


def _selection_facts(store: RunStore) -> list[dict] | None:
    """How many training prompts selection removed, or kept out of the narrow sets, and why (None: no record)."""
    if not store.has_table("decontamination"):
        return None
    decisions = store.read_table("decontamination")
    counts = decisions.groupby(["action", "reason"]).size().reset_index(name="prompts")
    return [{"action": "removed from training" if r["action"] == "removed" else "kept out of the narrow sets",
             "reason": r["reason"], "meaning": SELECTION_MEANINGS.get(r["reason"], ""), "prompts": int(r["prompts"])}
            for r in counts.to_dict("records")]


def _verification_facts(verification: dict | None) -> dict | None:
    if verification is None:
        return None
    checks = [{"check": c.get("check", "?"), "passed": bool(c.get("passed")), "offending": fmt(c.get("offending")),
               "threshold": "" if c.get("threshold") is None else fmt(c.get("threshold")),
               "detail": c.get("detail") or ""} for c in verification.get("checks", [])]
    return {"passed": bool(verification.get("passed")), "checked_at": verification.get("checked_at", "?"),
            "checks": checks, "settings": verification.get("settings") or {},
            # optional tables the run does not have are recorded as None
            "data_fingerprints": {t: fp for t, fp in (verification.get("data_fingerprints") or {}).items() if fp}}


def _audit_facts(store: RunStore) -> list[dict] | None:
    if not store.has_table("audit_summary"):
        return None
    rows = []
    for row in store.read_table("audit_summary").to_dict("records"):
        rows.append({"dataset": row.get("dataset"), "audited": fmt(row.get("audited")), "flagged": fmt(row.get("flagged")),
                     "removed": fmt(row.get("removed")), "agreement": fmt(row.get("agreement")),
                     "leak_rate": fmt(row.get("leak_rate")), "leak_rate_lo": fmt(row.get("leak_rate_lo")),
                     "leak_rate_hi": fmt(row.get("leak_rate_hi"))})
    return rows


def _leak_facts(store: RunStore) -> list[dict]:
    if not store.has_table("leak_scores"):
        return []
    scores = store.read_table("leak_scores")
    if scores.empty:
        return []
    grouped = scores.groupby("constitution")["leak_score"].agg(["max", "mean"]).reset_index()
    return [{"constitution": r["constitution"], "max_leak": float(r["max"]), "mean_leak": float(r["mean"])}
            for r in grouped.to_dict("records")]


def dataset_card(store: RunStore, repo_id: str, configs: list[DataConfig], url: str, license: str) -> str:
    """README.md of the dataset repo (YAML metadata + body)."""
    from huggingface_hub import DatasetCardData

    recipe = store.recipe()
    samples = store.read_table("samples")
    rejected = store.read_table("rejected") if store.has_table("rejected") else None
    narrow = list(recipe.splits.narrow_categories)
    heldout = recipe.held_out_categories()
    prompts = samples.drop_duplicates("prompt_id")
    per_category = prompts["category"].value_counts()
    per_source = prompts["source"].value_counts()
    default_config = next(c.name for c in configs if c.name.endswith("-broad"))
    namespace = repo_id.split("/")[0]
    year = str(store.meta().get("created_at", ""))[:4] or "?"

    context = {
        "pretty_name": f"Ethos {recipe.name}: constitution-conditioned critique/revision sets",
        "repo_id": repo_id, "run_name": recipe.name, "description": recipe.description, "namespace": namespace,
        "url": url, "year": year, "citation_key": re.sub(r"\W+", "_", repo_id),
        "narrow_categories": narrow, "heldout_categories": heldout, "default_config": default_config,
        "configs": [{"name": c.name, "what": c.what, "rows": c.rows} for c in configs],
        "categories": [{"category": cat, "narrow": cat in narrow, "prompts": int(n)} for cat, n in per_category.items()],
        "sources": [{"name": s.name, "role": s.role, "uri": public_uri(s.uri),
                     "note": f", {int(per_source.get(s.name, 0))} prompt(s) in these sets" if s.role == "train" else ""}
                    for s in recipe.sources],
        "constitutions": constitution_facts(recipe),
        "generation": _generation_facts(recipe, samples),
        "filters": _filter_facts(recipe, samples, rejected),
        "selection": _selection_facts(store),
        "verification": _verification_facts(read_verification(store)),
        "leak_scores": _leak_facts(store),
        "has_leak_scores": any(c.name == "leak_scores" for c in configs),
        "audit": _audit_facts(store),
        "confirmed": len(store.read_table("audit_confirmed")) if store.has_table("audit_confirmed") else 0,
    }
    hub_sources = sorted({s.uri for s in recipe.sources if s.role == "train" and is_hub_id(s.uri)})
    card_data = DatasetCardData(
        license=license,
        language=["en"],
        task_categories=["text-generation"],
        size_categories=[size_category(len(samples))],
        source_datasets=hub_sources or ["original"],
        pretty_name=context["pretty_name"],
        tags=["constitutional-ai", "ai-safety", "alignment", "critique-revision", "sft", "red-teaming", "ethos",
              *sorted(samples["constitution"].unique())],
        configs=[{"config_name": c.name, "data_files": [{"split": "train", "path": c.path}],
                  **({"default": True} if c.name == default_config else {})} for c in configs],
    )
    return compose(card_data, render_body("dataset_card.md", context))
