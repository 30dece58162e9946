"""Proof of the held-out filtering: DuckDB checks over a run's tables, the verification record, and the publish gate.

What is compared with what:

* **subjects** are the prompts of the samples (the user turn each SFT row trains on), every constitution's.
  Narrow-set samples are the rows of ``ethos.sets.load_sft_set(store, "<constitution>-narrow")`` (so samples
  removed by human audit no longer count); every other sample belongs to a broad set only.
* **references** are (a) every evaluation and over-refusal prompt (``eval_prompts``), compared with every
  sample, since evaluation prompts never enter training, and (b) every training prompt of a held-out
  category (``prompts_categorized`` rows of role train, including prompts the per-category cap left out;
  ``train_prompts`` when that table is absent), compared with narrow-set samples only.

The checks, each an SQL file in ``analysis/sql/``:

1. ``narrow_categories``: no narrow-set sample has a held-out category, by its own label and by its training
   prompt's (which must exist, and be marked ``in_narrow`` with a category confidence of at least
   ``categorization.narrow_min_confidence`` unless a human review confirmed it in a narrow category:
   ``audit_confirmed``).
2. ``normalized_text``: no subject equals a reference after normalisation (``sql/normalize.sql``).
3. ``ngram_overlap``: word-shingle Jaccard to every reference below ``verification.max_ngram_jaccard``.
4. ``embedding_similarity``: cosine to the nearest reference below ``verification.max_cosine``.
5. ``audit_flags_resolved``: every sample a human flagged as a held-out category is out of the narrow sets.

``run_verification`` writes ``verification.json`` (with the fingerprints of the tables it checked),
``verification.txt``, and the tables ``verification_checks`` and ``leak_scores``; ``assert_publishable``
refuses a run whose verification is missing, failed, or older than its data or settings.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd

from ethos.errors import EthosError
from ethos.stages import Stage, StageContext
from ethos.store import RunStore, _atomic_write_text, now, write_json

from .embeddings import embed_texts
from .matching import embedding_matches, register_frame, run_sql

CHECKS = (
    ("narrow_categories", "check_narrow_categories.sql", "no narrow-set sample has a held-out category"),
    ("normalized_text", "check_normalized_text.sql",
     "no sample repeats an evaluation prompt, and no narrow-set sample a held-out prompt, after normalisation"),
    ("ngram_overlap", "check_ngram_overlap.sql", "word-shingle Jaccard to those prompts stays below the threshold"),
    ("embedding_similarity", "check_embedding_similarity.sql",
     "embedding cosine to the nearest such prompt stays below the threshold"),
    ("audit_flags_resolved", "check_audit_flags.sql", "every sample a human flagged as held out left the narrow sets"),
)
REQUIRED_TABLES = ("samples", "train_prompts", "eval_prompts", "prompt_embeddings")
CHECKED_TABLES = REQUIRED_TABLES + ("prompts_categorized", "audit_removed", "audit_responses", "audit_confirmed")
SAMPLE_COLUMNS = ["sample_id", "prompt_id", "prompt", "constitution", "category", "in_narrow"]
RESULT_FILE = "verification.json"
SUMMARY_FILE = "verification.txt"
_JSON_IDS = 1000  # offending ids kept in verification.json per check (the table keeps them all)
_AUDIT_RESPONSES_SCHEMA = "sample_id VARCHAR, annotator VARCHAR, question VARCHAR, value VARCHAR, submitted_at TIMESTAMP"
_AUDIT_CONFIRMED_SCHEMA = "prompt_id VARCHAR, category VARCHAR, annotators VARCHAR"
_AUDIT_REMOVED_SCHEMA = "sample_id VARCHAR, constitution VARCHAR, category VARCHAR, rationale VARCHAR, annotator VARCHAR"


# -- inputs ------------------------------------------------------------------------------------------------------
def data_fingerprints(store: RunStore) -> dict[str, str | None]:
    """The current fingerprint of every table verification reads (None for an absent optional table)."""
    return {name: store.table_fingerprint(name) for name in CHECKED_TABLES}


def verification_settings(recipe) -> dict:
    """Everything in the recipe that changes the verdict; a change makes an earlier verification stale."""
    return {
        "narrow_categories": list(recipe.splits.narrow_categories),
        "held_out_categories": recipe.held_out_categories(),
        "narrow_min_confidence": recipe.categorization.narrow_min_confidence,
        "ngram_size": recipe.verification.ngram_size,
        "max_ngram_jaccard": recipe.verification.max_ngram_jaccard,
        "max_cosine": recipe.verification.max_cosine,
        "embedding_model": recipe.categorization.embedding_model,
    }


def _settings_hash(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def _require_tables(store: RunStore) -> None:
    missing = [t for t in REQUIRED_TABLES if not store.has_table(t)]
    if missing:
        raise EthosError(
            f"run {store.root} lacks table(s) {missing} that verification checks: run the stages up to generate "
            f"(`ethos run {store.root / 'recipe.yaml'} --out {store.root}`)"
        )


def load_verified_samples(store: RunStore) -> pd.DataFrame:
    """Every sample's prompt with ``in_narrow_set``: whether it belongs to its constitution's narrow set."""
    import pyarrow.parquet as pq
    from ethos.sets import load_sft_set

    path = store.table_path("samples")
    missing = sorted(set(SAMPLE_COLUMNS) - set(pq.read_schema(path).names))
    if missing:
        raise EthosError(f"table 'samples' in {store.root} lacks columns {missing}: re-run the generate stage")
    samples = pd.read_parquet(path, columns=SAMPLE_COLUMNS)
    if samples.empty:
        raise EthosError(f"table 'samples' in {store.root} is empty: nothing to verify; re-run the generate stage")
    if samples["sample_id"].duplicated().any():
        dup = samples.loc[samples["sample_id"].duplicated(), "sample_id"].iloc[0]
        raise EthosError(f"table 'samples' repeats sample id {dup!r}: re-run the generate stage")
    narrow_ids: set[str] = set()
    for constitution in sorted(samples["constitution"].unique()):
        narrow_ids.update(load_sft_set(store, f"{constitution}-narrow", columns=["sample_id"])["sample_id"])
    samples["in_narrow_set"] = samples["sample_id"].isin(narrow_ids)
    return samples.drop(columns=["in_narrow"])


# -- embeddings of subjects and references ----------------------------------------------------------------------
def _vectors(table, column: str = "embedding") -> tuple[np.ndarray, np.ndarray]:
    """(matrix, present mask) from an Arrow list column that may hold nulls."""
    col = table.column(column).combine_chunks()
    present = ~np.asarray(col.is_null().to_numpy(zero_copy_only=False), dtype=bool)
    values = np.asarray(col.flatten().to_numpy(zero_copy_only=False), dtype=np.float32)
    n_present = int(present.sum())
    dim = len(values) // n_present if n_present else 0
    if n_present and dim * n_present != len(values):
        raise EthosError("prompt_embeddings holds vectors of different lengths: re-run the categorize stage")
    matrix = np.zeros((len(present), dim), dtype=np.float32)
    matrix[present] = values.reshape(n_present, dim) if n_present else matrix[present]
    return matrix, present


def _fill_missing(matrix: np.ndarray, present: np.ndarray, texts: list[str], model_ref: str, cache_dir: Path) -> np.ndarray:
    """Embed the texts that have no stored embedding (prompts typed into samples, edited text)."""
    if present.all():
        return matrix
    todo = np.flatnonzero(~present)
    fresh = embed_texts([texts[i] for i in todo], model_ref, cache_dir=cache_dir, desc="embedding unseen prompts")
    if matrix.shape[1] == 0:
        matrix = np.zeros((len(present), fresh.shape[1]), dtype=np.float32)
    if fresh.shape[1] != matrix.shape[1]:
        raise EthosError(
            f"stored prompt embeddings have {matrix.shape[1]} dimensions but {model_ref!r} gives {fresh.shape[1]}: "
            "re-run the categorize stage with the recipe's embedding model"
        )
    matrix[todo] = fresh
    return matrix


def _embedding_results(con, model_ref: str, cache_dir: Path) -> pd.DataFrame:
    """Nearest applicable reference per (prompt text, narrow or not): subject_key, in_narrow_set, ref_id, cosine."""
    # A stored embedding serves a sample only when its prompt is, word for word, the text stored under its
    # prompt id; any other text (typed in, edited) is embedded afresh.
    subjects = con.sql("""
        SELECT s.subject_key, s.in_narrow_set, s.text, any_value(e.embedding) AS embedding
        FROM (SELECT md5(prompt) AS subject_key, in_narrow_set, prompt AS text, prompt_id FROM verify_samples) s
        LEFT JOIN train_prompts p ON p.prompt_id = s.prompt_id AND p.prompt = s.text
        LEFT JOIN prompt_embeddings e ON e.prompt_id = p.prompt_id
        GROUP BY s.subject_key, s.in_narrow_set, s.text
        ORDER BY s.subject_key, s.in_narrow_set""").to_arrow_table()
    refs = con.sql("""
        SELECT r.ref_id, r.kind, r.text, e.embedding
        FROM verify_references r LEFT JOIN prompt_embeddings e ON e.prompt_id = r.ref_id
        ORDER BY r.ref_id""").to_arrow_table()
    subject_vectors, present = _vectors(subjects)
    subject_vectors = _fill_missing(subject_vectors, present, subjects.column("text").to_pylist(), model_ref, cache_dir)
    ref_vectors, present = _vectors(refs)
    ref_vectors = _fill_missing(ref_vectors, present, refs.column("text").to_pylist(), model_ref, cache_dir)
    keys = np.asarray(subjects.column("subject_key").to_pylist(), dtype=object)
    narrow = np.asarray(subjects.column("in_narrow_set").to_pylist(), dtype=bool)
    ref_ids = np.asarray(refs.column("ref_id").to_pylist(), dtype=object)
    is_eval = np.asarray(refs.column("kind").to_pylist(), dtype=object) == "eval"
    parts = []
    # Narrow-set prompts face every reference; broad-only prompts face the evaluation prompts.
    for scope, ref_mask in ((True, np.ones(len(ref_ids), dtype=bool)), (False, is_eval)):
        rows = narrow == scope
        if rows.any() and ref_mask.any():
            found = embedding_matches(con, keys[rows], subject_vectors[rows], ref_ids[ref_mask], ref_vectors[ref_mask])
            parts.append(found.assign(in_narrow_set=scope))
    columns = ["subject_key", "in_narrow_set", "ref_id", "cosine"]
    return pd.concat(parts, ignore_index=True)[columns] if parts else pd.DataFrame(columns=columns)


# -- the checks --------------------------------------------------------------------------------------------------
def _prepare(con, store: RunStore, samples: pd.DataFrame, settings: dict) -> None:
    register_frame(con, "verify_samples", samples)
    pool = "prompts_categorized WHERE role = 'train'" if store.has_table("prompts_categorized") else "train_prompts"
    con.execute(f"CREATE OR REPLACE TEMP VIEW verify_training_pool AS SELECT prompt_id, prompt, category FROM {pool}")
    if not store.has_table("audit_responses"):
        con.execute(f"CREATE OR REPLACE TEMP TABLE audit_responses ({_AUDIT_RESPONSES_SCHEMA})")
    if not store.has_table("audit_removed"):
        con.execute(f"CREATE OR REPLACE TEMP TABLE audit_removed ({_AUDIT_REMOVED_SCHEMA})")
    if not store.has_table("audit_confirmed"):
        con.execute(f"CREATE OR REPLACE TEMP TABLE audit_confirmed ({_AUDIT_CONFIRMED_SCHEMA})")
    con.execute("CREATE OR REPLACE TEMP TABLE verify_offenses (check_name VARCHAR, sample_id VARCHAR, problem VARCHAR, "
                "ref_id VARCHAR, ref_category VARCHAR, score DOUBLE)")
    run_sql(con, "normalize.sql", narrow_categories=settings["narrow_categories"],
            held_out_categories=settings["held_out_categories"],
            narrow_min_confidence=float(settings["narrow_min_confidence"]), ngram_size=int(settings["ngram_size"]),
            jaccard_threshold=float(settings["max_ngram_jaccard"]), cosine_threshold=float(settings["max_cosine"]))
    run_sql(con, "verify_references.sql")


def _check_rows(offenses: pd.DataFrame, counts: dict, settings: dict, audit: dict) -> list[dict]:
    thresholds = {"ngram_overlap": settings["max_ngram_jaccard"], "embedding_similarity": settings["max_cosine"]}
    references = f"{counts['eval_prompts']} evaluation and {counts['heldout_prompts']} held-out prompts"
    passing = {
        "narrow_categories": f"all {counts['narrow_samples']} narrow-set samples are {' or '.join(settings['narrow_categories'])} "
                             f"and come from in_narrow training prompts categorised with confidence >= {settings['narrow_min_confidence']} "
                             "or confirmed by a category review",
        "normalized_text": f"{counts['samples']} samples against {references}: no normalised repeat",
        "ngram_overlap": f"{counts['samples']} samples against {references}: every {settings['ngram_size']}-word shingle "
                         f"Jaccard below {settings['max_ngram_jaccard']}",
        "embedding_similarity": f"{counts['samples']} samples against {references}: every nearest cosine below {settings['max_cosine']}",
        "audit_flags_resolved": (f"{audit['responses']} audit responses: {audit['flagged']} samples flagged, none left in a narrow set"
                                 if audit["present"] else "no human audit recorded yet (no audit_responses table): nothing to resolve"),
    }
    rows = []
    for name, _, guards in CHECKS:
        mine = offenses[offenses["check_name"] == name].sort_values(["sample_id", "score"], ascending=[True, False])
        ids = sorted(mine["sample_id"].unique().tolist())
        if ids:
            first = mine.iloc[0]
            scope = counts["narrow_samples"] if name in ("narrow_categories", "audit_flags_resolved") else counts["samples"]
            detail = f"{len(ids)} of {scope} samples fail ({guards}); e.g. {first['sample_id']}: {first['problem']}"
        else:
            detail = passing[name]
        rows.append({"check": name, "passed": not ids, "offending": len(ids), "offending_ids": ids,
                     "threshold": thresholds.get(name), "detail": detail})
    return rows


def run_verification(store: RunStore) -> dict:
    """Run every check over the run's tables; write verification.json, verification.txt, verification_checks
    and leak_scores; return the verification record."""
    if not (Path(store.root) / "run.json").exists():
        store = RunStore.open(store.root)  # raises the one-line 'not a run folder' error
    _require_tables(store)
    recipe = store.recipe()
    settings = verification_settings(recipe)
    fingerprints = data_fingerprints(store)
    timings = {}
    started = time.perf_counter()
    samples = load_verified_samples(store)
    timings["load_samples_s"] = time.perf_counter() - started
    cache_dir = store.root / "cache" / "embeddings"
    with store.connect() as con:
        mark = time.perf_counter()
        _prepare(con, store, samples, settings)
        con.execute("CREATE OR REPLACE TEMP VIEW match_subjects AS SELECT subject_key, text FROM verify_subjects")
        con.execute("CREATE OR REPLACE TEMP VIEW match_references AS SELECT ref_id, text FROM verify_references")
        run_sql(con, "text_matching.sql")
        timings["text_matching_s"] = time.perf_counter() - mark
        mark = time.perf_counter()
        register_frame(con, "embedding_results", _embedding_results(con, settings["embedding_model"], cache_dir))
        timings["embedding_search_s"] = time.perf_counter() - mark
        mark = time.perf_counter()
        for _, sql_file, _ in CHECKS:
            run_sql(con, sql_file)
        offenses = con.execute("SELECT * FROM verify_offenses").df()
        leak_scores = run_sql(con, "leak_scores.sql").df()
        counts = con.execute("""
            SELECT (SELECT count(*) FROM verify_samples) AS samples,
                   (SELECT count(*) FROM verify_samples WHERE in_narrow_set) AS narrow_samples,
                   (SELECT count(*) FROM verify_subjects) AS distinct_prompts,
                   (SELECT count(*) FROM verify_references WHERE kind = 'eval') AS eval_prompts,
                   (SELECT count(*) FROM verify_references WHERE kind = 'heldout') AS heldout_prompts,
                   (SELECT count(*) FROM text_matches) AS text_candidate_pairs""").df().iloc[0].to_dict()
        audit = con.execute("""
            SELECT count(*) AS responses, count(DISTINCT annotator) AS annotators,
                   count(DISTINCT sample_id) FILTER (WHERE list_contains(getvariable('held_out_categories')::VARCHAR[],
                                                                         value::VARCHAR)) AS flagged
            FROM audit_responses""").df().iloc[0].to_dict()
        timings["checks_s"] = time.perf_counter() - mark
    counts = {k: int(v) for k, v in counts.items()}
    audit = {k: int(v) for k, v in audit.items()} | {"present": store.has_table("audit_responses")}
    rows = _check_rows(offenses, counts, settings, audit)
    checks_table = pd.DataFrame(rows, columns=["check", "passed", "offending", "offending_ids", "threshold", "detail"])
    checks_table["threshold"] = checks_table["threshold"].astype(float)
    store.write_table("verification_checks", checks_table, "verify")
    store.write_table("leak_scores", leak_scores, "verify")
    timings["total_s"] = time.perf_counter() - started
    result = {
        "passed": all(r["passed"] for r in rows),
        "checked_at": now().isoformat(timespec="seconds"),
        "run": store.meta().get("name"),
        "data_fingerprints": fingerprints,
        "settings": settings,
        "settings_hash": _settings_hash(settings),
        "counts": counts,
        "checks": [{**r, "offending_ids": r["offending_ids"][:_JSON_IDS],
                    "offending_ids_truncated": len(r["offending_ids"]) > _JSON_IDS} for r in rows],
        "timings": {k: round(v, 3) for k, v in timings.items()},
    }
    write_json(store.root / RESULT_FILE, result)
    _atomic_write_text(store.root / SUMMARY_FILE, format_summary(result))
    return result


def format_summary(result: dict, max_ids: int = 20) -> str:
    """The verification record as text a reviewer reads: verdict, counts, each check with offending sample ids."""
    counts = result["counts"]
    lines = [
        f"verification of run {result['run']} at {result['checked_at']} UTC: {'PASSED' if result['passed'] else 'FAILED'}",
        f"  {counts['samples']} samples ({counts['narrow_samples']} in narrow sets, {counts['distinct_prompts']} distinct prompts) "
        f"against {counts['eval_prompts']} evaluation and {counts['heldout_prompts']} held-out prompts",
        f"  narrow categories: {', '.join(result['settings']['narrow_categories'])}; "
        f"held out: {', '.join(result['settings']['held_out_categories'])}",
    ]
    for check in result["checks"]:
        lines.append(f"  [{'pass' if check['passed'] else 'FAIL'}] {check['check']}: {check['detail']}")
        if not check["passed"]:
            shown = check["offending_ids"][:max_ids]
            more = check["offending"] - len(shown)
            lines.append(f"         offending samples ({check['offending']}): {', '.join(shown)}" + (f" and {more} more" if more > 0 else ""))
    return "\n".join(lines) + "\n"


# -- the publish gate --------------------------------------------------------------------------------------------
def assert_publishable(store: RunStore) -> None:
    """Raise EthosError unless the run's verification exists, passed, and is newer than its data and settings."""
    path = Path(store.root) / RESULT_FILE
    if not path.exists():
        raise EthosError(f"run {store.root} has not been verified: run `ethos verify {store.root}` before publishing")
    try:
        result = json.loads(path.read_text())
        recorded = result["data_fingerprints"]
        passed = result["passed"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise EthosError(f"{path} is not a verification record: run `ethos verify {store.root}` again") from None
    current = data_fingerprints(store)
    changed = sorted(name for name in set(current) | set(recorded) if current.get(name) != recorded.get(name))
    if changed:
        raise EthosError(f"verification of {store.root} is older than its data (changed since {result.get('checked_at')}: "
                         f"{', '.join(changed)}): run `ethos verify {store.root}` again")
    if result.get("settings_hash") != _settings_hash(verification_settings(store.recipe())):
        raise EthosError(f"verification of {store.root} used other settings than the run's recipe: run `ethos verify {store.root}` again")
    if not passed:
        failed = [c["check"] for c in result.get("checks", []) if not c.get("passed")]
        raise EthosError(f"verification of {store.root} failed ({', '.join(failed)}): fix the data, see {store.root / SUMMARY_FILE}, "
                         f"and run `ethos verify {store.root}` again")


# -- the stage and the command -----------------------------------------------------------------------------------
def _run(ctx: StageContext) -> None:
    result = run_verification(ctx.store)
    print(format_summary(result), end="")
    ctx.written.update({"verification_checks": len(result["checks"]), "leak_scores": result["counts"]["narrow_samples"]})
    if not result["passed"] and ctx.recipe.verification.stop_on_failure:
        failed = ", ".join(f"{c['check']} ({c['offending']} samples)" for c in result["checks"] if not c["passed"])
        raise EthosError(
            f"verification failed: {failed}; no training on "
            f"leaky data. See {ctx.store.root / SUMMARY_FILE}, fix the data (or audit), and re-run"
        )


STAGE = Stage(
    name="verify",
    description="prove with DuckDB that narrow sets hold no held-out category or evaluation prompt",
    reads=("samples", "train_prompts", "eval_prompts", "prompt_embeddings", "prompts_categorized?", "audit_removed?",
           "audit_confirmed?", "audit_responses?"),
    writes=("verification_checks", "leak_scores"),
    sections=("verification", "splits", "categorization"),
    run=_run,
)


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="a run folder with samples (after the generate stage)")


def run_cli(args) -> int:
    store = RunStore.open(args.run_dir)
    result = run_verification(store)
    print(format_summary(result), end="")
    print(f"written: {store.root / RESULT_FILE}, {store.root / SUMMARY_FILE}")
    return 0 if result["passed"] else 1
