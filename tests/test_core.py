"""The foundation: recipes, taxonomy, prompt loaders, the run store and stage runner, the CLI, the embedded model."""

from __future__ import annotations

import csv
import functools
import http.server
import os
import subprocess
import sys
import threading

import pandas as pd
import pytest
import yaml

from conftest import tiny_recipe
from ethos.errors import EthosError, RecipeError
from ethos.paths import PROJECT_ROOT, RECIPES_DIR
from ethos.recipe import SourceConfig, load_recipe, parse_recipe
from ethos.sources import load_source
from ethos.stages import Stage, run_stage, stage_state
from ethos.store import RunStore
from ethos.taxonomy import load_taxonomy

ETHOS = [sys.executable, "-m", "ethos.cli"]


def run_cli(*args, env=None, cwd=PROJECT_ROOT):
    return subprocess.run([*ETHOS, *map(str, args)], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, **(env or {})}, timeout=600)


# -- recipes --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["demo.yaml", "paper.yaml"])
def test_shipped_recipes_validate(name):
    recipe = load_recipe(RECIPES_DIR / name)
    assert len(recipe.dataset_names()) == 8
    assert recipe.taxonomy_obj().narrow == ("harassment", "illegal_activity")


def test_broken_recipe_reports_every_problem_with_its_path(tmp_path, write_recipe):
    recipe = tiny_recipe(constitutions=["deontology", "stoicism"])
    recipe["splits"] = {"narrow_categories": ["harassment", "piracy"]}
    recipe["sources"][0]["columns"] = {"text": "prompt"}
    recipe["generation"] = {"max_new_tokens": "many", "temperature": -1}
    path = write_recipe(recipe)
    before = set(tmp_path.rglob("*"))
    result = run_cli("validate", path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    expected = {
        "constitutions[1]": "unknown constitution 'stoicism'",
        "splits.narrow_categories[1]": "unknown category 'piracy'",
        "sources[0].columns": "missing column mapping for 'prompt'",
        "generation.max_new_tokens": "valid integer",
        "generation.temperature": "greater than or equal to 0",
    }
    for where, what in expected.items():
        assert any(where in line and what in line for line in lines), (where, lines)
    assert len(lines) == len(expected)
    assert set(tmp_path.rglob("*")) == before  # validation writes nothing


def test_run_refuses_broken_recipe_without_writing(tmp_path, write_recipe):
    path = write_recipe(tiny_recipe(constitutions=["stoicism"]))
    result = run_cli("run", path, "--out", tmp_path / "run")
    assert result.returncode == 2 and "stoicism" in result.stderr
    assert not (tmp_path / "run").exists()


def test_unknown_setting_and_bad_yaml(tmp_path):
    with pytest.raises(RecipeError) as err:
        parse_recipe({**tiny_recipe(), "trainng": {}}, "r.yaml", tmp_path)
    assert err.value.problems == ["trainng: unknown setting (check the spelling against datasets/recipes/demo.yaml)"]
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(bad)


# -- taxonomy and loaders over every public file ------------------------------------------------------------
def test_taxonomy_maps_every_label_of_the_public_sets(shared_data):
    taxonomy = load_taxonomy()
    assert set(taxonomy.held_out) == set(taxonomy.categories) - {"harassment", "illegal_activity"}
    for mapping, file, column in [("harmbench", "harmbench/harmbench_behaviors_text_all.csv", "SemanticCategory"),
                                  ("strongreject", "strongreject/strongreject_dataset.csv", "category"),
                                  ("xstest", "xstest/xstest_prompts.csv", "type")]:
        labels = {row[column] for row in csv.DictReader(open(shared_data / file))}
        mapped = {label: taxonomy.map_label(mapping, label) for label in labels}
        assert all(v is None or v in taxonomy.categories for v in mapped.values())
    assert taxonomy.map_label("harmbench", "harassment_bullying") == "harassment"
    assert taxonomy.map_label("strongreject", "Non-violent crimes") == "illegal_activity"
    assert taxonomy.map_label("harmbench", "copyright") is None
    with pytest.raises(EthosError, match="no entry in taxonomy mapping"):
        taxonomy.map_label("harmbench", "space_piracy")


def _source(**kw) -> SourceConfig:
    return SourceConfig.model_validate(kw)


@pytest.fixture
def recipe_obj(tmp_path):
    return parse_recipe(tiny_recipe(), "tiny.yaml", tmp_path)


def test_loaders_read_every_public_file(shared_data, recipe_obj):
    harm = load_source(_source(name="harmbench", uri=str(shared_data / "harmbench/harmbench_behaviors_text_all.csv"),
                               role="eval", columns={"id": "BehaviorID", "prompt": "Behavior", "category": "SemanticCategory"}),
                       recipe_obj)
    assert len(harm) == 300  # 400 behaviours minus 100 copyright ones, dropped by the mapping
    assert "copyright" not in set(harm["source_label"]) and harm["category"].notna().all()
    strong = load_source(_source(name="strongreject", uri=str(shared_data / "strongreject/strongreject_dataset.csv"),
                                 role="train", columns={"prompt": "forbidden_prompt", "category": "category"}), recipe_obj)
    assert len(strong) == 313 and set(strong["category"]) >= {"harassment", "illegal_activity", "violence"}
    adv = load_source(_source(name="advbench", uri=str(shared_data / "advbench/advbench_behaviors.csv"), role="train",
                              columns={"id": "BehaviorID", "prompt": "Behavior"}), recipe_obj)
    assert len(adv) == 520 and adv["category"].isna().all()
    xs = load_source(_source(name="xstest", uri=str(shared_data / "xstest/xstest_prompts.csv"), role="overrefusal",
                             columns={"id": "id", "prompt": "prompt", "category": "type"}, where={"label": ["safe"]}),
                     recipe_obj)
    assert len(xs) == 250
    for persona_file in sorted((shared_data / "persona").glob("*.jsonl")):
        frame = load_source(_source(name="persona", uri=str(persona_file), role="eval",
                                    columns={"prompt": "statement"}), recipe_obj)
        assert len(frame) == 1000, persona_file.name
    capped = load_source(_source(name="harmbench", uri=str(shared_data / "harmbench/harmbench_behaviors_text_all.csv"),
                                 role="eval", columns={"id": "BehaviorID", "prompt": "Behavior", "category": "SemanticCategory"},
                                 where={"FunctionalCategory": ["standard"]}, limit_per_category=3), recipe_obj)
    assert capped.groupby("category").size().max() == 3
    assert capped["prompt_id"].tolist() == load_source(  # deterministic sampling
        _source(name="harmbench", uri=str(shared_data / "harmbench/harmbench_behaviors_text_all.csv"), role="eval",
                columns={"id": "BehaviorID", "prompt": "Behavior", "category": "SemanticCategory"},
                where={"FunctionalCategory": ["standard"]}, limit_per_category=3), recipe_obj)["prompt_id"].tolist()


def test_loader_reads_a_url(shared_data, recipe_obj):
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(shared_data / "xstest"))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/xstest_prompts.csv"
        frame = load_source(_source(name="xstest", uri=url, role="overrefusal",
                                    columns={"id": "id", "prompt": "prompt", "category": "type"}), recipe_obj)
        assert len(frame) == 450
        with pytest.raises(EthosError, match="cannot read"):
            load_source(_source(name="xstest", uri=url.replace("xstest_prompts", "missing"), role="eval",
                                columns={"prompt": "prompt"}), recipe_obj)
    finally:
        server.shutdown()


def test_loader_errors_are_one_line(shared_data, recipe_obj):
    with pytest.raises(EthosError, match=r"columns \['Prompt'\] not in the data") as err:
        load_source(_source(name="x", uri=str(shared_data / "xstest/xstest_prompts.csv"), role="eval",
                            columns={"prompt": "Prompt"}), recipe_obj)
    assert "\n" not in str(err.value)
    with pytest.raises(EthosError, match="gave no prompts"):
        load_source(_source(name="x", uri=str(shared_data / "xstest/xstest_prompts.csv"), role="eval",
                            columns={"prompt": "prompt"}, where={"label": ["nothing"]}), recipe_obj)
    with pytest.raises(EthosError, match="no taxonomy mapping named 'x'"):
        load_source(_source(name="x", uri=str(shared_data / "xstest/xstest_prompts.csv"), role="eval",
                            columns={"prompt": "prompt", "category": "type"}), recipe_obj)


def test_hub_source_offline_gives_one_line(tmp_path, write_recipe):
    recipe = tiny_recipe()
    recipe["sources"][0] = {"name": "strongreject", "uri": "walledai/StrongREJECT", "role": "train",
                            "columns": {"prompt": "prompt", "category": "category"}}
    result = run_cli("run", write_recipe(recipe), "--out", tmp_path / "run", "--only", "prompts",
                     env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")})
    assert result.returncode == 2
    error_lines = [l for l in result.stderr.splitlines() if l.startswith("ethos: error:")]
    assert len(error_lines) == 1 and "walledai/StrongREJECT" in error_lines[0]
    assert not (tmp_path / "run/tables/prompts.parquet").exists()


# -- the run store and the stage runner ------------------------------------------------------------------------
def test_prompts_stage_runs_skips_and_reruns(tmp_path, write_recipe):
    recipe_path = write_recipe(tiny_recipe())
    store = RunStore.create(tmp_path / "run", recipe_path)
    recipe = store.recipe()
    from ethos.sources import PROMPTS_STAGE

    assert run_stage(PROMPTS_STAGE, recipe, store, log=lambda *_: None)
    prompts = store.read_table("prompts")
    assert set(prompts["role"]) == {"train", "eval", "overrefusal"}
    assert (prompts[prompts.source == "seeds"]["category"].value_counts() == 6).all()
    # The catalog knows the table, with a view DuckDB can query.
    counts = store.query("SELECT role, count(*) AS n FROM prompts GROUP BY role ORDER BY role")
    assert counts["n"].sum() == len(prompts)
    info = store.table_info("prompts")
    assert info["rows"] == len(prompts) and info["stage"] == "prompts"
    assert stage_state(PROMPTS_STAGE, recipe, store) == "done"
    assert not run_stage(PROMPTS_STAGE, recipe, store, log=lambda *_: None)  # unchanged: skipped
    # A change to a section the stage depends on makes it stale.
    changed = tiny_recipe()
    changed["sources"][2]["limit"] = 2
    recipe_path.write_text(yaml.safe_dump(changed))
    store = RunStore.create(tmp_path / "run", recipe_path)
    assert stage_state(PROMPTS_STAGE, store.recipe(), store) == "stale"
    assert run_stage(PROMPTS_STAGE, store.recipe(), store, log=lambda *_: None)
    assert (store.read_table("prompts")["role"] == "overrefusal").sum() == 2


def test_failed_stage_is_recorded_and_leaves_no_partial_table(tmp_path, write_recipe):
    store = RunStore.create(tmp_path / "run", write_recipe(tiny_recipe()))

    def boom(ctx):
        ctx.write("first", pd.DataFrame({"a": [1]}))
        raise EthosError("deliberate failure: fix nothing")

    stage = Stage("boom", "fails on purpose", (), ("first", "second"), (), boom)
    with pytest.raises(EthosError):
        run_stage(stage, store.recipe(), store, log=lambda *_: None)
    record = store.stage_record("boom")
    assert record["status"] == "failed" and "deliberate failure" in record["message"]
    assert not list(store.tables_dir.glob("*.tmp"))
    assert stage_state(stage, store.recipe(), store) == "failed"


def test_stage_needing_missing_input_names_it(tmp_path, write_recipe):
    store = RunStore.create(tmp_path / "run", write_recipe(tiny_recipe()))
    stage = Stage("needs", "needs input", ("samples",), ("x",), (), lambda ctx: None)
    with pytest.raises(EthosError, match="needs table 'samples'"):
        run_stage(stage, store.recipe(), store, log=lambda *_: None)


def test_cli_run_and_status(tmp_path, write_recipe):
    path = write_recipe(tiny_recipe())
    out = tmp_path / "run"
    result = run_cli("run", path, "--out", out, "--only", "prompts")
    assert result.returncode == 0, result.stderr
    status = run_cli("status", out)
    assert status.returncode == 0
    line = next(l for l in status.stdout.splitlines() if l.strip().startswith("prompts"))
    assert "done" in line and "prompts=" in line
    assert run_cli("status", tmp_path / "nowhere").returncode == 2
    again = run_cli("run", path, "--out", out, "--only", "prompts")
    assert "up to date, skipped" in again.stdout


def test_run_folder_of_another_recipe_is_refused(tmp_path, write_recipe):
    out = tmp_path / "run"
    RunStore.create(out, write_recipe(tiny_recipe()))
    other = write_recipe(tiny_recipe(name="other"), name="other.yaml")
    with pytest.raises(EthosError, match="holds run 'tiny'"):
        RunStore.create(out, other)


# -- the embedded model --------------------------------------------------------------------------------------
def test_embedded_model_gives_a_chat_reply(embedded_model):
    from ethos.models import chat_generate

    model, tokenizer = embedded_model
    replies = chat_generate(model, tokenizer, [[{"role": "user", "content": "What is the capital of France?"}],
                                               [{"role": "user", "content": "Name a colour."}]],
                            max_new_tokens=20, batch_size=2)
    assert "Paris" in replies[0]["text"]
    assert all(r["text"] and r["finish_reason"] in ("stop", "length") for r in replies)


def test_option_logprobs_follow_the_model_and_ignore_batching(embedded_model):
    import torch

    from ethos.models import option_logprobs, render_chat

    model, tokenizer = embedded_model
    convs = [[{"role": "user", "content": "Reply with the single word Yes."}],
             [{"role": "user", "content": "Reply with the single word No, and nothing else at all."}]]
    scores = option_logprobs(model, tokenizer, convs, ["Yes", "No"])
    assert scores.shape == (2, 2)
    assert scores[0, 0] > scores[0, 1] and scores[1, 1] > scores[1, 0]
    multi = option_logprobs(model, tokenizer, convs, ["Yes", "Maybe not"], batch_size=1)
    assert multi[:, 0] == pytest.approx(scores[:, 0], abs=0.1)  # bf16: batch shape moves the last digits
    # A multi-token option scores the sum of its tokens' log-probabilities, as one plain forward pass says.
    prompt = tokenizer(render_chat(tokenizer, convs[1:])[0], add_special_tokens=False)["input_ids"]
    option = tokenizer("Maybe not", add_special_tokens=False)["input_ids"]
    with torch.inference_mode():
        logp = torch.log_softmax(model(torch.tensor([prompt + option])).logits[0].float(), -1)
    expected = sum(logp[len(prompt) + k - 1, tok].item() for k, tok in enumerate(option))
    assert multi[1, 1] == pytest.approx(expected, abs=0.05)


def test_missing_model_gives_one_line():
    from ethos.models import load_causal_lm

    with pytest.raises(EthosError, match="not found") as err:
        load_causal_lm("./no/such/model/folder")
    assert "\n" not in str(err.value)


def test_generate_fingerprint_follows_the_judge_only_when_filters_use_it(tmp_path, write_recipe):
    from ethos.pipelines.generate import STAGE as GENERATE

    def generate_hash(filters_judge: bool, judge: str) -> str:
        recipe = load_recipe(write_recipe(tiny_recipe(filters={"judge": filters_judge}, evaluation={
            "judge": judge, "judge_base_url": "http://127.0.0.1:9/v1", "judge_model": "guard"})))
        return recipe.section_hash(*GENERATE.recipe_sections(recipe))

    assert generate_hash(False, "embedded") == generate_hash(False, "openai")
    assert generate_hash(True, "embedded") != generate_hash(True, "openai")
