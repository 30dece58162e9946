"""The generate stage: constitution-conditioned critique/revision samples from ``train_prompts``, with distilabel.

    train_prompts -> initial answer (helpful-only model, once per prompt) -> one row per (constitution, prompt)
    -> critique against one drawn principle -> revision -> quality filters -> samples, rejected

Resuming: distilabel caches the pipeline's progress in ``<run>/distilabel/``; running the stage again (after a
failure or a kill -9) continues from there. The cache folder is named after everything the generated text
depends on (the prompts table, the model and generation settings); distilabel's own step signatures add the
constitutions. Two things are adjusted for crash safety and offline use:

- distilabel resumes only from a graceful stop: after a kill -9, batches that were being processed are lost
  and the resumed run hangs, and leaf rows held in its 50-row write buffer are lost. ``_CrashSafe`` records
  in-flight batches and hands them back on resume, every finished leaf batch is written at once (atomically),
  and distilabel's cache files are written atomically. A batch redone after a crash can appear twice in the
  files, so rows are deduplicated by ``sample_id`` when read.
- distilabel fetches BibTeX citations over the network, with no timeout, when it builds its Distiset at the end;
  offline that hangs. We turn that lookup off for our runs (the citations are not used).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import uuid
from pathlib import Path

import pandas as pd

from ethos.errors import EthosError
from ethos.store import atomic_path
from ethos.stages import Stage, StageContext

log = logging.getLogger(__name__)

PROMPT_COLUMNS = ["prompt_id", "prompt", "source", "category", "in_narrow"]
SAMPLE_COLUMNS = [
    "sample_id", "prompt_id", "prompt", "source", "category", "in_narrow", "constitution", "principle_id",
    "principle_seed", "initial_answer", "critique", "revision", "messages", "model_id", "generation_params",
]
LEAF_STEP = "revision"
CACHE_FOLDER = "distilabel"


def load_constitutions(recipe) -> dict[str, dict]:
    """The recipe's constitutions by name, as plain dicts (what the distilabel steps carry)."""
    from ethos.constitutions import load_constitution

    out = {}
    for ref in recipe.constitutions:
        constitution = load_constitution(ref if not ref.endswith((".yaml", ".yml")) else str(recipe.resolve_path(ref)))
        if constitution.name in out:
            raise EthosError(f"constitution {constitution.name!r} is listed twice in `constitutions`: list each once")
        out[constitution.name] = constitution.model_dump(mode="json")
    return out


def check_prompts(frame: pd.DataFrame) -> pd.DataFrame:
    missing = [c for c in PROMPT_COLUMNS if c not in frame.columns]
    if missing:
        raise EthosError(f"table train_prompts lacks columns {missing} (see docs/ARCHITECTURE.md): rerun the select stage")
    if frame.empty:
        raise EthosError("table train_prompts is empty: nothing to generate from; check the sources and splits settings")
    if frame["prompt_id"].duplicated().any():
        dupe = frame.loc[frame["prompt_id"].duplicated(), "prompt_id"].iloc[0]
        raise EthosError(f"table train_prompts repeats prompt_id {dupe!r}: rerun the select stage")
    return frame[PROMPT_COLUMNS].sort_values("prompt_id").reset_index(drop=True)


def generation_params(recipe) -> dict:
    import distilabel

    gen = recipe.generation
    return {
        "backend": gen.backend, "served_model": gen.served_model, "dtype": recipe.model.dtype,
        "max_new_tokens": gen.max_new_tokens, "temperature": gen.temperature, "top_p": gen.top_p,
        "batch_size": gen.batch_size, "seed": gen.seed, "distilabel": distilabel.__version__,
    }


def cache_key(prompts: pd.DataFrame, recipe) -> str:
    """Names the distilabel cache: distilabel's signatures leave out the input data, so we key on it here."""
    basis = {
        "prompts": hashlib.sha256(pd.util.hash_pandas_object(prompts.astype(str), index=False).values.tobytes()).hexdigest(),
        "model": recipe.model.model_dump(mode="json"),
        "generation": recipe.generation.model_dump(mode="json", exclude={"ray"}),
    }
    return hashlib.sha256(json.dumps(basis, sort_keys=True).encode()).hexdigest()[:12]


# -- distilabel, adjusted for crash safety and offline use ----------------------------------------------------------

def _durable_write_buffer_class():
    import pyarrow as pa
    import pyarrow.parquet as pq
    from distilabel.pipeline.write_buffer import _WriteBuffer

    class DurableWriteBuffer(_WriteBuffer):
        """Writes each leaf batch to its own parquet file (temporary file + rename) as soon as it arrives."""

        def add_batch(self, batch) -> None:
            rows = batch.data[0]
            if not rows:
                return
            # distilabel sorts these files by int(stem): digits only (the batch number, then a random tag).
            final = self._path / batch.step_name / f"{batch.seq_no:06d}{uuid.uuid4().int % 10**8:08d}.parquet"
            with atomic_path(final) as tmp:
                pq.write_table(pa.Table.from_pylist(rows), tmp)

        def close(self) -> None:
            pass  # nothing is held back

    return DurableWriteBuffer


class _CrashSafe:
    """Mixin for distilabel pipelines that makes resuming after a kill -9 complete.

    distilabel resumes cleanly only from a graceful stop: batches that were handed to a step and not finished
    when the process died are forgotten, and the resumed run waits for them forever. We record every batch
    sent to a (non-generator) step in ``ethos_inflight.json`` beside distilabel's batch manager, drop it once
    its output is cached, and hand the unfinished ones back to the batch manager on resume. The file is written
    before distilabel's cache (with everything in flight) and again after it (without what finished), so a
    kill at any moment can only cause a batch to be redone (its rows are deduplicated), never lost. Leaf
    outputs go through DurableWriteBuffer.
    """

    def _inflight_path(self) -> Path:
        return self._cache_location["batch_manager"].with_name("ethos_inflight.json")

    def _inflight(self) -> dict:
        if not hasattr(self, "_ethos_inflight"):
            self._ethos_inflight, self._ethos_finished = {}, set()
        return self._ethos_inflight

    def _write_inflight(self) -> None:
        from distilabel.utils.serialization import write_json

        write_json(self._inflight_path(), [b.dump() for _, b in sorted(self._inflight().items())])

    def _send_batch_to_step(self, batch) -> None:
        from distilabel import constants

        if not self.dag.get_step(batch.step_name)[constants.STEP_ATTR_NAME].is_generator:
            self._inflight()[(batch.step_name, batch.seq_no)] = batch.copy()
        super()._send_batch_to_step(batch)

    def _register_batch(self, batch) -> None:
        super()._register_batch(batch)
        self._inflight()
        self._ethos_finished.add((batch.step_name, batch.seq_no))

    def _cache(self) -> None:
        if self._dry_run:
            return super()._cache()
        self._write_inflight()
        super()._cache()
        for key in self._ethos_finished:
            self._inflight().pop(key, None)
        self._ethos_finished.clear()
        self._write_inflight()

    def _load_batch_manager(self, use_cache: bool = True) -> None:
        from distilabel.pipeline.batch import _Batch
        from distilabel.utils.serialization import read_json

        super()._load_batch_manager(use_cache)
        path = self._inflight_path()
        if not (use_cache and path.exists()):
            return
        resent = 0
        for dump in read_json(path):
            batch = _Batch.from_dict(dump)
            step = self._batch_manager._steps.get(batch.step_name)
            if step is None or any(b.seq_no == batch.seq_no for b in step.built_batches):
                continue
            step.built_batches.append(batch)
            step.built_batches.sort(key=lambda b: b.seq_no)
            resent += 1
        if resent:
            self._logger.info(f"♻️ {resent} batch(es) unfinished when the last run stopped will be processed again")

    def _setup_write_buffer(self, use_cache: bool = True) -> None:
        from distilabel import constants

        path = self._cache_location["data"] / constants.STEPS_OUTPUTS_PATH
        self._logger.info(f"📝 Pipeline data will be written to '{path}'")
        self._write_buffer = _durable_write_buffer_class()(
            path, self.dag.leaf_steps,
            steps_cached={name: self.dag.get_step(name)[constants.STEP_ATTR_NAME].use_cache for name in self.dag},
        )


def _pipeline_classes():
    from distilabel.pipeline import Pipeline
    from distilabel.pipeline.ray import RayPipeline

    class EthosRayPipeline(_CrashSafe, RayPipeline):
        pass

    class EthosPipeline(_CrashSafe, Pipeline):
        def ray(self, ray_head_node_url=None, ray_init_kwargs=None):
            pipeline = EthosRayPipeline(name=self.name, description=self.description, cache_dir=self._cache_dir,
                                        enable_metadata=self._enable_metadata, requirements=self.requirements,
                                        ray_head_node_url=ray_head_node_url, ray_init_kwargs=ray_init_kwargs)
            pipeline.dag = self.dag
            return pipeline

    return EthosPipeline


@contextlib.contextmanager
def _restored_logging():
    """distilabel replaces the root logger's handlers with a queue it closes at the end, and mutes some libraries'
    loggers; put everything back so the stages that run after this one in the same process still log."""
    from distilabel.utils import logging as distilabel_logging

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    muted = {name: logging.getLogger(name).level for name in distilabel_logging._SILENT_LOGGERS}
    try:
        yield
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
        for name, old in muted.items():
            logging.getLogger(name).setLevel(old)


def _atomic_write_json(filename: Path, data) -> None:
    import orjson

    with atomic_path(filename) as tmp:
        tmp.write_bytes(orjson.dumps(data, option=orjson.OPT_SERIALIZE_NUMPY))


def _atomic_write_yaml(filename: Path, data) -> None:
    import yaml

    with atomic_path(filename) as tmp:
        tmp.write_text(yaml.dump(data, default_flow_style=False, sort_keys=False))


@contextlib.contextmanager
def _patched_distilabel():
    """Two narrow patches while our pipeline runs, both undone afterwards:

    - distilabel.distiset._grab_citations downloads BibTeX with no timeout when the Distiset is built; offline
      runs would hang on it, and we do not use the citations.
    - distilabel writes its cache's JSON and YAML files in place; a kill mid-write would leave a torn file that the next
      run cannot read. We write them to a temporary file and rename.
    """
    import distilabel.distiset as distiset
    import distilabel.utils.serialization as serialization

    originals = distiset._grab_citations, serialization.write_json, serialization.write_yaml
    distiset._grab_citations = lambda dag: []
    serialization.write_json, serialization.write_yaml = _atomic_write_json, _atomic_write_yaml
    try:
        yield
    finally:
        distiset._grab_citations, serialization.write_json, serialization.write_yaml = originals


def build_pipeline(recipe, prompts: pd.DataFrame, constitutions: dict[str, dict], cache_dir: Path, llm=None):
    """The distilabel pipeline: load prompts -> initial answer -> fan out per constitution -> critique -> revision."""
    from distilabel.steps import LoadDataFromDicts

    from .llms import build_llm
    from .steps import Critique, FanOutConstitutions, InitialAnswer, Revision

    llm = llm or build_llm(recipe)
    batch = recipe.generation.batch_size
    quiet = {"add_raw_output": False, "add_raw_input": False}
    records = prompts.astype(object).where(prompts.notna(), None).to_dict("records")
    pipeline_class = _pipeline_classes()
    with pipeline_class(name=f"ethos-generate-{cache_key(prompts, recipe)}", cache_dir=cache_dir,
                        description="Constitutional-AI critique/revision samples (Ethos)") as pipeline:
        load = LoadDataFromDicts(name="load_prompts", data=records, batch_size=batch)
        # Each task gets its own copy: distilabel runs each step in its own process with its own model.
        initial = InitialAnswer(name="initial_answer", llm=llm.model_copy(deep=True), input_batch_size=batch, **quiet)
        fan_out = FanOutConstitutions(name="fan_out", constitutions=constitutions, seed=recipe.generation.seed,
                                      input_batch_size=batch)
        critique = Critique(name="critique", llm=llm.model_copy(deep=True), constitutions=constitutions, input_batch_size=batch, **quiet)
        revision = Revision(name=LEAF_STEP, llm=llm.model_copy(deep=True), constitutions=constitutions, input_batch_size=batch, **quiet)
        load >> initial >> fan_out >> critique >> revision
    return pipeline


def read_outputs(pipeline) -> pd.DataFrame:
    """Every row the leaf step has written, one per sample_id (a batch recomputed after a crash is kept once)."""
    from distilabel import constants

    folder = pipeline._cache_location["data"] / constants.STEPS_OUTPUTS_PATH / LEAF_STEP
    files = sorted(folder.glob("*.parquet")) if folder.exists() else []
    if not files:
        return pd.DataFrame(columns=["constitution", "prompt_id"])
    frame = pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)
    frame["sample_id"] = frame["constitution"] + ":" + frame["prompt_id"]
    return frame.drop_duplicates("sample_id", keep="first").reset_index(drop=True)


def run_distilabel(recipe, prompts: pd.DataFrame, constitutions: dict[str, dict], cache_dir: Path, llm=None) -> pd.DataFrame:
    """Run (or resume) the pipeline and return its rows, one per (constitution, prompt)."""
    pipeline = build_pipeline(recipe, prompts, constitutions, cache_dir, llm)
    if recipe.generation.ray:
        try:
            import ray  # noqa: F401
        except ImportError:
            raise EthosError("generation.ray is true but Ray is not installed: pip install 'ray[default]' (or set ray: false)") from None
    runner = pipeline.ray() if recipe.generation.ray else pipeline
    with _patched_distilabel(), _restored_logging():
        try:
            runner.run(use_cache=True)
        except RuntimeError as exc:
            raise EthosError(f"distilabel pipeline failed ({str(exc).splitlines()[0]}); details in {pipeline._cache_location['log_file']}") from None
    rows = read_outputs(pipeline)
    expected = {f"{c}:{p}" for c in constitutions for p in prompts["prompt_id"]}
    missing = expected - set(rows["sample_id"]) if len(rows) else expected
    if missing:
        raise EthosError(
            f"the distilabel run in {cache_dir} ended without {len(missing)} of {len(expected)} samples (e.g. {sorted(missing)[0]}); "
            f"delete {pipeline._cache_location['data'].parent} and rerun the generate stage"
        )
    return rows[rows["sample_id"].isin(expected)]


def assemble(rows: pd.DataFrame, prompts: pd.DataFrame, recipe, constitution_order: list[str]) -> pd.DataFrame:
    """The pipeline's rows in the samples schema (plus ``revision_finish``, which only the filters read)."""
    from ethos.models import model_id

    frame = rows.drop(columns=[c for c in ("prompt", "source", "category", "in_narrow") if c in rows.columns])
    frame = frame.merge(prompts, on="prompt_id", how="left", validate="many_to_one")
    frame["messages"] = [
        [{"role": "user", "content": p}, {"role": "assistant", "content": r if isinstance(r, str) else ""}]
        for p, r in zip(frame["prompt"], frame["revision"])
    ]
    frame["model_id"] = model_id(recipe.model.name)
    frame["generation_params"] = json.dumps(generation_params(recipe), sort_keys=True)
    frame["principle_seed"] = frame["principle_seed"].astype("int64")
    frame["in_narrow"] = frame["in_narrow"].astype(bool)
    order = {name: i for i, name in enumerate(constitution_order)}
    frame = frame.assign(_c=frame["constitution"].map(order)).sort_values(["_c", "prompt_id"]).drop(columns="_c")
    return frame[SAMPLE_COLUMNS + ["revision_finish"]].reset_index(drop=True)


def generate_samples(recipe, prompts: pd.DataFrame, cache_dir: Path, llm=None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(samples, rejected) for the recipe's constitutions over ``prompts`` (a train_prompts frame)."""
    from .filters import apply_filters

    prompts = check_prompts(prompts)
    constitutions = load_constitutions(recipe)
    rows = run_distilabel(recipe, prompts, constitutions, Path(cache_dir), llm)
    frame = assemble(rows, prompts, recipe, list(constitutions))
    if frame["revision"].isna().all():
        raise EthosError(f"the model produced no text for any sample: see the distilabel log under {cache_dir}")
    accepted, rejected = apply_filters(frame, recipe.filters, recipe)
    return accepted[SAMPLE_COLUMNS], rejected[SAMPLE_COLUMNS + ["reason"]]


def _run(ctx: StageContext) -> None:
    samples, rejected = generate_samples(ctx.recipe, ctx.read("train_prompts"), ctx.store.root / CACHE_FOLDER)
    counts = rejected["reason"].value_counts().to_dict()
    log.info("generate: %d samples kept, %d rejected %s", len(samples), len(rejected), counts)
    ctx.write("samples", samples)
    ctx.write("rejected", rejected)


STAGE = Stage(
    name="generate",
    description="critique and revise the helpful-only model's answers under each constitution (distilabel)",
    reads=("train_prompts",),
    writes=("samples", "rejected"),
    sections=("model", "constitutions", "generation", "filters"),
    run=_run,
    # filters.judge uses the evaluation section's judge, so a new judge must re-filter.
    conditional_sections=lambda recipe: ("evaluation",) if recipe.filters.judge else (),
)
