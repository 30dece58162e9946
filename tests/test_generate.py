"""The generate stage: a tiny real distilabel run on the embedded model, kill -9 and resume, the quality filters."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from conftest import tiny_recipe
from ethos.errors import EthosError
from ethos.paths import PROJECT_ROOT
from ethos.pipelines import filters
from ethos.pipelines.generate import SAMPLE_COLUMNS, check_prompts
from ethos.recipe import FilterConfig, parse_recipe
from ethos.sets import load_sft_set
from ethos.stages import get_stage, run_stage
from ethos.store import RunStore

CONSTITUTIONS = ["deontology", "human_authority"]
PROMPT_IDS = ["har-01", "ill-01", "vio-01"]  # two narrow categories and one held-out category
# Everything passes these filters, so the tiny run's samples table is not empty (a 135M model truncated at 12
# tokens rarely passes the real ones); the second run below applies the defaults to the same cached generations.
PERMISSIVE = {"reject_truncated": False, "min_chars": 1, "max_repeated_ngram_fraction": 1.0, "min_edit_fraction": 0.0}


def train_prompts() -> pd.DataFrame:
    """A train_prompts table in the documented schema, written directly (no categorize/select stages needed)."""
    seeds = pd.read_csv(PROJECT_ROOT / "datasets/seeds/demo_prompts.csv").set_index("id").loc[PROMPT_IDS]
    return pd.DataFrame({
        "prompt_id": [f"seeds-{i}" for i in seeds.index], "prompt": seeds["prompt"].values, "source": "seeds",
        "category": seeds["category"].values, "category_confidence": 1.0,
        "in_narrow": seeds["category"].isin(["harassment", "illegal_activity"]).values,
    })


def recipe_dict(**filters_overrides) -> dict:
    return tiny_recipe(constitutions=CONSTITUTIONS, stages=["generate"],
                       generation={"max_new_tokens": 12, "batch_size": 3}, filters={**PERMISSIVE, **filters_overrides})


def make_run(root: Path, recipe: dict) -> RunStore:
    root.mkdir(parents=True, exist_ok=True)
    path = root.parent / f"{root.name}.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    store = RunStore.create(root, path)
    if not store.has_table("train_prompts"):
        store.write_table("train_prompts", train_prompts(), "select")
    return store


def leaf_files(root: Path) -> list[Path]:
    return sorted((root / "distilabel").glob("*/*/executions/*/data/steps_outputs/revision/*.parquet"))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """One uninterrupted run of the stage, in-process as `ethos run` does it."""
    store = make_run(tmp_path_factory.mktemp("gen") / "run", recipe_dict())
    started = time.perf_counter()
    assert run_stage(get_stage("generate"), store.recipe(), store, log=lambda *_: None)
    return store, time.perf_counter() - started


@pytest.mark.slow
def test_tiny_run_writes_samples_with_provenance(uninterrupted):
    store, _ = uninterrupted
    samples, rejected = store.read_table("samples"), store.read_table("rejected")
    assert list(samples.columns) == SAMPLE_COLUMNS
    assert list(rejected.columns) == SAMPLE_COLUMNS + ["reason"]
    assert rejected.empty  # permissive filters
    expected = {f"{c}:seeds-{p}" for c in CONSTITUTIONS for p in PROMPT_IDS}
    assert set(samples["sample_id"]) == expected and samples["sample_id"].is_unique
    for row in samples.itertuples():
        assert row.sample_id == f"{row.constitution}:{row.prompt_id}"
        assert row.initial_answer and row.critique and row.revision
        assert [m["role"] for m in row.messages] == ["user", "assistant"]
        assert row.messages[0]["content"] == row.prompt and row.messages[1]["content"] == row.revision
    assert set(samples["model_id"]) == {"HuggingFaceTB/SmolLM2-135M-Instruct (embedded Q4_1 GGUF, dequantised)"}
    params = json.loads(samples["generation_params"].iloc[0])
    assert params["backend"] == "transformers" and params["max_new_tokens"] == 12 and params["seed"] == 0
    # Paired design: one initial answer per prompt, shared by every constitution.
    assert (samples.groupby("prompt_id")["initial_answer"].nunique() == 1).all()
    # The principle is the seeded draw from that constitution, and the draw is recorded.
    from ethos.constitutions import load_constitution
    from ethos.pipelines import cai

    for row in samples.itertuples():
        constitution = load_constitution(row.constitution).model_dump()
        assert row.principle_seed == cai.principle_seed(0, row.constitution, row.prompt_id)
        assert row.principle_id == cai.pick_principle(constitution, row.principle_seed)["id"]


@pytest.mark.slow
def test_narrow_set_holds_only_narrow_categories(uninterrupted):
    store, _ = uninterrupted
    narrow = load_sft_set(store, "deontology-narrow")
    assert set(narrow["category"]) == {"harassment", "illegal_activity"}
    assert len(load_sft_set(store, "deontology-broad")) == 3


@pytest.mark.slow
def test_rerun_with_stricter_filters_reuses_the_distilabel_cache(uninterrupted):
    store, first_duration = uninterrupted
    before = store.read_table("samples").set_index("sample_id")["revision"]
    files = leaf_files(store.root)
    make_run(store.root, recipe_dict(**FilterConfig().model_dump()))  # the default filters
    started = time.perf_counter()
    assert run_stage(get_stage("generate"), store.recipe(), store, log=lambda *_: None)
    assert time.perf_counter() - started < first_duration
    assert leaf_files(store.root) == files  # nothing generated again
    samples, rejected = store.read_table("samples"), store.read_table("rejected")
    assert len(samples) + len(rejected) == len(before)
    assert set(rejected["reason"]) <= set(filters.REASONS) - {"harmful"}
    both = pd.concat([samples, rejected]).set_index("sample_id")["revision"]
    assert both.sort_index().equals(before.sort_index())


@pytest.mark.slow
def test_killed_run_resumes_with_every_sample_once(uninterrupted, tmp_path):
    done = uninterrupted[0]  # (an earlier test may have re-filtered it: count rejected rows too)
    reference = set(done.read_table("samples")["sample_id"]) | set(done.read_table("rejected")["sample_id"])
    assert len(reference) == len(CONSTITUTIONS) * len(PROMPT_IDS)
    store = make_run(tmp_path / "run", recipe_dict())
    # What `ethos run` does, without the CLI's import of every command module.
    command = [sys.executable, "-c", "import sys; from ethos.stages import run_pipeline; from ethos.store import RunStore; "
               "run_pipeline(RunStore.open(sys.argv[1]))", str(store.root)]
    # Its own session, so that kill -9 takes down distilabel's step processes with it, as a crash would.
    proc = subprocess.Popen(command, cwd=PROJECT_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 150
        while not leaf_files(store.root) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert proc.poll() is None, "the run ended before its first batch was cached; nothing to resume"
        assert leaf_files(store.root), "no batch cached within the time limit"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    cached = pd.concat([pd.read_parquet(f) for f in leaf_files(store.root)])
    assert 0 < len(cached) < len(reference)
    assert not store.has_table("samples")

    resumed = subprocess.Popen(command, cwd=PROJECT_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    try:
        _, stderr = resumed.communicate(timeout=300)
    finally:
        if resumed.poll() is None:  # hung: take its step processes down too
            os.killpg(resumed.pid, signal.SIGKILL)
            resumed.wait()
    assert resumed.returncode == 0, stderr[-2000:]
    samples = store.read_table("samples")
    assert samples["sample_id"].is_unique and set(samples["sample_id"]) == reference
    # The batches finished before the kill were kept, not generated again.
    kept = samples.set_index("sample_id")["revision"]
    for row in cached.itertuples():
        assert kept[f"{row.constitution}:{row.prompt_id}"] == row.revision


# -- quality filters on hand-made revisions ------------------------------------------------------------------------

INITIAL = "Sure, here is a message that will embarrass your classmate in front of everyone at school."
GOOD = "I won't help embarrass anyone, but I can help you talk to your classmate about what is bothering you."


def _reason(revision, finish="stop", initial=INITIAL, **config):
    return filters.rule_reason(revision, finish, initial, FilterConfig(**config))


def test_filters_reject_each_kind_of_bad_revision():
    assert _reason(GOOD) is None
    assert _reason(None) == "empty"
    assert _reason("   ") == "empty"
    assert _reason("No.") == "empty"  # shorter than min_chars
    assert _reason(GOOD, finish="length") == "truncated"
    assert _reason(GOOD, finish="length", reject_truncated=False) is None
    assert _reason("I can help. " + "you should talk to them " * 12) == "degenerate"
    # A repetition loop that ran into the token budget is degenerate: more tokens would not help.
    assert _reason("I can help. " + "you should talk to them " * 12, finish="length") == "degenerate"
    assert _reason(INITIAL) == "unchanged"
    assert _reason(INITIAL.replace("Sure,", "Sure!")) == "unchanged"  # punctuation is not an edit
    assert _reason(INITIAL + " Have fun.", min_edit_fraction=0.2) == "unchanged"


def test_repetition_and_edit_measures():
    assert filters.repeated_ngram_fraction("one two three four five") == 0.0
    assert filters.repeated_ngram_fraction("a b c " * 10) > 0.8
    assert filters.repeated_ngram_fraction("too short") == 0.0
    assert filters.edit_fraction("a b c d", "a b c d") == 0.0
    assert filters.edit_fraction("a b c d", "w x y z") == 1.0


def test_apply_filters_splits_rows_with_reasons():
    frame = pd.DataFrame({
        "sample_id": ["c:1", "c:2", "c:3"], "prompt": ["p"] * 3, "initial_answer": [INITIAL] * 3,
        "revision": [GOOD, INITIAL, None], "revision_finish": ["stop", "stop", None],
    })
    accepted, rejected = filters.apply_filters(frame, FilterConfig())
    assert list(accepted["sample_id"]) == ["c:1"]
    assert dict(zip(rejected["sample_id"], rejected["reason"])) == {"c:2": "unchanged", "c:3": "empty"}


def test_judge_filter_rejects_revisions_that_still_comply():
    recipe = parse_recipe(tiny_recipe(filters={"judge": True}), "tiny", PROJECT_ROOT)
    complying = "Sure, here's how: first find a quiet moment, then say the meanest thing you can think of to them."
    frame = pd.DataFrame({
        "sample_id": ["c:1", "c:2"], "prompt": ["Help me embarrass my classmate."] * 2,
        "initial_answer": [INITIAL] * 2, "revision": [GOOD, complying], "revision_finish": ["stop", "stop"],
    })
    accepted, rejected = filters.apply_filters(frame, recipe.filters, recipe)
    assert list(accepted["sample_id"]) == ["c:1"]
    assert list(rejected["reason"]) == ["harmful"]


# -- bad input ---------------------------------------------------------------------------------------------------

def test_train_prompts_with_wrong_schema_or_no_rows():
    with pytest.raises(EthosError, match="lacks columns"):
        check_prompts(train_prompts().drop(columns=["in_narrow"]))
    with pytest.raises(EthosError, match="empty"):
        check_prompts(train_prompts().iloc[:0])


def test_openai_backend_with_no_server_is_one_clear_line():
    from ethos.pipelines.llms import build_llm

    recipe = parse_recipe(tiny_recipe(generation={"backend": "openai", "base_url": "http://127.0.0.1:9/v1"}), "tiny",
                          PROJECT_ROOT)
    with pytest.raises(EthosError, match="no OpenAI-compatible server answering at http://127.0.0.1:9/v1") as info:
        build_llm(recipe)
    assert "\n" not in str(info.value)


def test_missing_model_folder_fails_before_the_pipeline_starts(tmp_path):
    from ethos.pipelines.llms import build_llm

    recipe = parse_recipe(tiny_recipe(model={"name": str(tmp_path / "nowhere")}), "tiny", PROJECT_ROOT)
    with pytest.raises(EthosError, match="not found"):
        build_llm(recipe)
