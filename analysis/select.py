"""The select stage: the training pool, decontaminated, capped and marked for the narrow sets; the evaluation prompts.

1. Every training prompt that repeats an evaluation or over-refusal prompt leaves the pool: the same text
   (``exact``), the same normalised text (``normalized``), word-shingle Jaccard >= verification.max_ngram_jaccard
   (``ngram``) or embedding cosine >= verification.max_cosine (``embedding``). Evaluation prompts never enter
   training.
2. Training prompts with the same normalised text as another one are dropped (``duplicate``; the smallest
   prompt id stays).
3. Each category keeps at most splits.train_prompts_per_category prompts, sampled with splits.seed.
4. ``in_narrow``: the category is one of splits.narrow_categories, it is not ``needs_audit``, its confidence
   reaches categorization.narrow_min_confidence (source labels have 1.0; voted ones below it stay broad-only,
   reason ``narrow_confidence``, action ``not_narrow``), the labelled prompts of the other sources do not vote
   its source label into a held-out category with that confidence (reason ``heldout_vote``; see
   ``contradicted_labels``), and the prompt is not a near-duplicate of any held-out training prompt (a prompt
   of role train whose category is held out, whether or not it survived the cap) by the same three
   text/embedding tests (reason ``heldout_<test>``). Prompts that fail stay in the broad pool, action
   ``not_narrow``; a human category review can bring the doubtful ones back (``ethos.analysis.audit``).

``decontamination`` lists every decision: ``prompt_id, reason, matched_prompt_id, score, action``
(``removed`` from the pool, or ``not_narrow``). The matching itself is the SQL that ``ethos verify`` runs.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from ethos.errors import EthosError
from ethos.stages import Stage, StageContext

from .categorize import CATEGORIZED_COLUMNS, VOTING_ROLES, knn_vote
from .matching import embedding_matches, normalized_texts, text_matches

TRAIN_COLUMNS = ["prompt_id", "prompt", "source", "category", "category_confidence", "in_narrow", "needs_audit"]
EVAL_COLUMNS = ["prompt_id", "prompt", "source", "category", "role", "scope"]
DECONTAMINATION_COLUMNS = ["prompt_id", "reason", "matched_prompt_id", "score", "action"]
EVAL_ROLES = ("eval", "overrefusal")


def embedding_matrix(embeddings: pd.DataFrame, prompt_ids: pd.Series) -> np.ndarray:
    """The stored embeddings of the given prompts, in order; every prompt must have one."""
    lookup = embeddings.set_index("prompt_id")["embedding"]
    missing = prompt_ids[~prompt_ids.isin(lookup.index)]
    if len(missing):
        raise EthosError(
            f"prompt_embeddings lacks {len(missing)} prompts (e.g. {missing.iloc[0]!r}): re-run the categorize stage"
        )
    rows = lookup.loc[prompt_ids.to_numpy()].to_numpy()
    return np.stack([np.asarray(r, dtype=np.float32) for r in rows]) if len(rows) else np.zeros((0, 1), np.float32)


def near_duplicates(con, subjects: pd.DataFrame, references: pd.DataFrame, embeddings: pd.DataFrame,
                    verification, prefix: str = "") -> pd.DataFrame:
    """For each subject prompt that repeats a reference prompt: its strongest match.

    Tests in order of strength: exact text, normalised text, shingle Jaccard, embedding cosine. Returns
    ``prompt_id, reason, matched_prompt_id, score``.
    """
    if subjects.empty or references.empty:
        return pd.DataFrame(columns=DECONTAMINATION_COLUMNS[:4])
    found = []
    exact = subjects[["prompt_id", "prompt"]].merge(
        references[["prompt_id", "prompt"]].rename(columns={"prompt_id": "matched_prompt_id"}), on="prompt")
    found.append(exact.assign(reason=prefix + "exact", score=1.0, rank=0))
    text = text_matches(con, subjects.rename(columns={"prompt_id": "subject_key", "prompt": "text"}),
                        references.rename(columns={"prompt_id": "ref_id", "prompt": "text"}),
                        verification.ngram_size, verification.max_ngram_jaccard)
    text = text.rename(columns={"subject_key": "prompt_id", "ref_id": "matched_prompt_id"})
    normalized = text[text["normalized_match"]]
    found.append(normalized.assign(reason=prefix + "normalized", score=1.0, rank=1))
    ngram = text[text["jaccard"] >= verification.max_ngram_jaccard]
    found.append(ngram.assign(reason=prefix + "ngram", score=ngram["jaccard"], rank=2))
    cosine = embedding_matches(con, subjects["prompt_id"], embedding_matrix(embeddings, subjects["prompt_id"]),
                               references["prompt_id"], embedding_matrix(embeddings, references["prompt_id"]))
    cosine = cosine[cosine["cosine"] >= verification.max_cosine]
    found.append(cosine.rename(columns={"subject_key": "prompt_id", "ref_id": "matched_prompt_id"})
                 .assign(reason=prefix + "embedding", score=cosine["cosine"], rank=3))
    cols = ["prompt_id", "reason", "matched_prompt_id", "score", "rank"]
    matches = pd.concat([f[cols] for f in found if len(f)], ignore_index=True) if any(len(f) for f in found) else None
    if matches is None:
        return pd.DataFrame(columns=DECONTAMINATION_COLUMNS[:4])
    matches = matches.sort_values(["prompt_id", "rank", "score", "matched_prompt_id"], ascending=[True, True, False, True])
    return matches.drop_duplicates("prompt_id")[DECONTAMINATION_COLUMNS[:4]].reset_index(drop=True)


def contradicted_labels(candidates: pd.DataFrame, categorized: pd.DataFrame, embeddings: pd.DataFrame, k: int,
                        held_out: list[str], min_share: float) -> pd.DataFrame:
    """Source-labelled candidates that the labelled prompts of *other* sources confidently vote into a held-out
    category: ``prompt_id, reason ('heldout_vote'), matched_prompt_id (nearest such voter), score (vote share)``.

    Sources file prompts differently (StrongREJECT's "Non-violent crimes" holds malware requests, which this
    taxonomy calls cybercrime), so a source's own label is checked against the others'. Only candidates whose
    category the voters also use are checked, so that agreement is possible, and only with at least k voters.
    """
    voters = categorized[(categorized["category_method"] == "source_label") & categorized["role"].isin(VOTING_ROLES)]
    found = []
    for source, group in candidates[candidates["category_method"] == "source_label"].groupby("source"):
        others = voters[voters["source"] != source]
        group = group[group["category"].isin(set(others["category"]))]
        if len(others) < k or group.empty:
            continue
        queries, references = embedding_matrix(embeddings, group["prompt_id"]), embedding_matrix(embeddings, others["prompt_id"])
        votes, shares = knn_vote(queries, references, others["category"].to_numpy(), k)
        hit = np.isin(votes, held_out) & (shares >= min_share)
        nearest = others["prompt_id"].to_numpy()[(queries[hit] @ references.T).argmax(axis=1)] if hit.any() else []
        found.append(pd.DataFrame({"prompt_id": group["prompt_id"].to_numpy()[hit], "reason": "heldout_vote",
                                   "matched_prompt_id": nearest, "score": shares[hit]}))
    return pd.concat(found, ignore_index=True) if found else pd.DataFrame(columns=DECONTAMINATION_COLUMNS[:4])


def cap_per_category(pool: pd.DataFrame, cap: int | None, seed: int) -> pd.DataFrame:
    if cap is None:
        return pool
    pool = pool.sort_values("prompt_id")
    parts = [g.sample(min(len(g), cap), random_state=seed) for _, g in pool.groupby("category", sort=True)]
    return pd.concat(parts) if parts else pool


def select(categorized: pd.DataFrame, embeddings: pd.DataFrame, recipe) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(train_prompts, eval_prompts, decontamination)."""
    import duckdb

    missing = sorted(set(CATEGORIZED_COLUMNS) - set(categorized.columns))
    if missing:
        raise EthosError(f"table 'prompts_categorized' lacks columns {missing}: re-run the categorize stage")
    if categorized["category"].isna().any():
        raise EthosError("table 'prompts_categorized' has prompts without a category: re-run the categorize stage")
    narrow = set(recipe.splits.narrow_categories)
    verification = recipe.verification
    categorized = categorized.sort_values("prompt_id").reset_index(drop=True)
    pool = categorized[categorized["role"] == "train"]
    evals = categorized[categorized["role"].isin(EVAL_ROLES)]
    if pool.empty:
        raise EthosError("no prompts of role 'train': add a training source to the recipe")
    decisions = []
    con = duckdb.connect()
    try:
        contaminated = near_duplicates(con, pool, evals, embeddings, verification)
        decisions.append(contaminated.assign(action="removed"))
        pool = pool[~pool["prompt_id"].isin(contaminated["prompt_id"])]

        norm = normalized_texts(con, pool["prompt"])
        first = pool.groupby(norm)["prompt_id"].transform("min")
        dupes = pool[pool["prompt_id"] != first]
        decisions.append(pd.DataFrame({"prompt_id": dupes["prompt_id"], "reason": "duplicate",
                                       "matched_prompt_id": first[dupes.index], "score": 1.0, "action": "removed"}))
        pool = pool[pool["prompt_id"] == first]
        if pool.empty:
            raise EthosError("no training prompts left after decontamination: every one repeats an evaluation prompt")

        pool = cap_per_category(pool, recipe.splits.train_prompts_per_category, recipe.splits.seed)
        pool = pool.assign(in_narrow=pool["category"].isin(narrow) & ~pool["needs_audit"].astype(bool))
        unsure = pool[pool["in_narrow"] & (pool["category_confidence"] < recipe.categorization.narrow_min_confidence)]
        decisions.append(pd.DataFrame({"prompt_id": unsure["prompt_id"], "reason": "narrow_confidence",
                                       "matched_prompt_id": None, "score": unsure["category_confidence"],
                                       "action": "not_narrow"}))
        pool.loc[pool["prompt_id"].isin(unsure["prompt_id"]), "in_narrow"] = False
        contradicted = contradicted_labels(pool[pool["in_narrow"]], categorized, embeddings, recipe.categorization.k,
                                           recipe.held_out_categories(), recipe.categorization.narrow_min_confidence)
        decisions.append(contradicted.assign(action="not_narrow"))
        pool.loc[pool["prompt_id"].isin(contradicted["prompt_id"]), "in_narrow"] = False
        held_out = categorized[(categorized["role"] == "train") & ~categorized["category"].isin(narrow)]
        near_held_out = near_duplicates(con, pool[pool["in_narrow"]], held_out, embeddings, verification, prefix="heldout_")
        decisions.append(near_held_out.assign(action="not_narrow"))
        pool.loc[pool["prompt_id"].isin(near_held_out["prompt_id"]), "in_narrow"] = False
    finally:
        con.close()

    train = pool.sort_values("prompt_id")[TRAIN_COLUMNS].reset_index(drop=True)
    train["in_narrow"] = train["in_narrow"].astype(bool)
    train["needs_audit"] = train["needs_audit"].astype(bool)
    eval_prompts = evals.assign(scope=np.where(evals["category"].isin(narrow), "narrow", "heldout"))[EVAL_COLUMNS]
    decontamination = pd.concat([d for d in decisions if len(d)] or [pd.DataFrame(columns=DECONTAMINATION_COLUMNS)],
                                ignore_index=True)[DECONTAMINATION_COLUMNS]
    decontamination["score"] = decontamination["score"].astype(float)
    return train, eval_prompts.reset_index(drop=True), decontamination.sort_values(["action", "prompt_id"]).reset_index(drop=True)


def _run(ctx: StageContext) -> None:
    train, eval_prompts, decontamination = select(ctx.read("prompts_categorized"), ctx.read("prompt_embeddings"), ctx.recipe)
    counts = decontamination.groupby(["action", "reason"]).size()
    if len(counts):
        print("[select] " + ", ".join(f"{action} {reason}: {n}" for (action, reason), n in counts.items()))
    print(f"[select] {len(train)} training prompts ({int(train['in_narrow'].sum())} narrow), {len(eval_prompts)} evaluation prompts")
    ctx.write("train_prompts", train)
    ctx.write("eval_prompts", eval_prompts)
    ctx.write("decontamination", decontamination)


STAGE = Stage(
    name="select",
    description="decontaminate training prompts against evaluation prompts, cap per category, mark the narrow ones",
    reads=("prompts_categorized", "prompt_embeddings"),
    writes=("train_prompts", "eval_prompts", "decontamination"),
    sections=("splits", "verification", "categorization"),
    run=_run,
)
