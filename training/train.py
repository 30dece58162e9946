"""The train stage and ``ethos train``: one LoRA adapter per SFT set of a run, or one on any chat dataset.

    ethos train RUN_DIR [--only deontology-narrow ...] [--force]
    ethos train --data FILE_OR_HUB_ID --out ADAPTER_DIR [--base MODEL] [--recipe RECIPE_OR_SETTINGS.yaml]

Both forms build ``AdapterJob``s and hand them to ``ethos.training.lora.train_adapter``: the same trainer,
settings, staging, resume and provenance. Adapters whose rows and settings are unchanged are not retrained.
Under ``accelerate launch`` every process trains (data-parallel) and only the main one writes the catalog.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pandas as pd

from ethos.errors import EthosError
from ethos.stages import Stage, StageContext
from ethos.store import RunStore
from ethos.yamlfile import read_yaml

ADAPTER_COLUMNS = ["name", "constitution", "scope", "path", "base_model", "dataset_fingerprint", "recipe_hash",
                   "train_rows", "train_loss", "tokens_seen", "wall_time_s"]


def _distributed_state():
    from accelerate import PartialState

    return PartialState()


def _quiet(*_args, **_kwargs) -> None:
    """Echo for the non-main processes of a multi-process launch: the main one speaks for all."""


def _run_jobs(store: RunStore, recipe, only: list[str] | None = None, force: bool = False, echo=print) -> list:
    """Train the run's adapters that are missing or out of date; returns the job of every dataset of the run."""
    from accelerate.utils import broadcast_object_list

    from ethos.sets import load_sft_set, split_name

    from .data import to_prompt_completion
    from .lora import AdapterJob, is_current, train_adapter

    names = recipe.dataset_names()
    unknown = sorted(set(only or []) - set(names))
    if unknown:
        raise EthosError(f"unknown dataset(s) {unknown} for --only: this run has {names}")
    state = _distributed_state()
    # Only the main process opens the catalog (DuckDB allows one writer); the others receive the rows.
    rows_by_name = {}
    if state.is_main_process:
        rows_by_name = {name: to_prompt_completion(load_sft_set(store, name), f"dataset {name}") for name in names}
    rows_by_name = broadcast_object_list([rows_by_name])[0]

    jobs = []
    for name in names:
        constitution, scope = split_name(name)
        jobs.append(AdapterJob(name=name, rows=rows_by_name[name], model=recipe.model, training=recipe.training,
                               out_dir=store.root / "adapters" / name,
                               meta={"constitution": constitution, "scope": scope, "run": recipe.name}))
    selected = [job for job in jobs if only is None or job.name in only]
    for i, job in enumerate(selected, 1):
        if not force and is_current(job):
            echo(f"[train] ({i}/{len(selected)}) {job.name}: up to date, skipped")
            continue
        echo(f"[train] ({i}/{len(selected)}) {job.name}")
        train_adapter(job, echo=echo)
    return jobs


def _register(store: RunStore, jobs: list, echo=print) -> pd.DataFrame:
    """Catalog every current adapter and return the ``adapters`` table (stale or missing ones are left out)."""
    import json

    from ethos.store import file_sha256

    from .lora import METRICS_FILE, is_current, read_provenance

    rows = []
    for job in jobs:
        if not is_current(job):
            echo(f"[train] {job.name}: no current adapter, left out of the adapters table "
                 f"(train it with `ethos train {store.root} --only {job.name}`)")
            continue
        provenance = read_provenance(job.out_dir)
        metrics = json.loads((job.out_dir / METRICS_FILE).read_text())
        summary = {k: v for k, v in metrics.items() if k != "loss_curve"}
        store.register_artifact(job.name, "adapter", "train", job.out_dir,
                                file_sha256(job.out_dir / "adapter_model.safetensors"), {**provenance, **summary})
        rows.append({
            "name": job.name, "constitution": provenance["constitution"], "scope": provenance["scope"],
            "path": str(job.out_dir.relative_to(store.root)), "base_model": provenance["base_model"],
            "dataset_fingerprint": provenance["dataset_fingerprint"], "recipe_hash": provenance["recipe_hash"],
            "train_rows": provenance["train_rows"], "train_loss": metrics["train_loss"],
            "tokens_seen": metrics["tokens_seen"], "wall_time_s": metrics["wall_time_s"],
        })
    return pd.DataFrame(rows, columns=ADAPTER_COLUMNS)


def train_run(store: RunStore, recipe, only: list[str] | None = None, force: bool = False, echo=print) -> pd.DataFrame | None:
    """Train a run's adapters; on the main process returns the ``adapters`` table (None on the others)."""
    state = _distributed_state()
    echo = echo if state.is_main_process else _quiet
    jobs = _run_jobs(store, recipe, only=only, force=force, echo=echo)
    return _register(store, jobs, echo=echo) if state.is_main_process else None


def _run(ctx: StageContext) -> None:
    ctx.write("adapters", train_run(ctx.store, ctx.recipe))


STAGE = Stage(
    name="train",
    description="train a LoRA adapter per constitution and scope (TRL SFTTrainer + PEFT)",
    reads=("samples", "audit_removed?", "audit_confirmed?"),
    writes=("adapters",),
    sections=("model", "training"),
    run=_run,
)


# -- settings for bring-your-own data ------------------------------------------------------------------------
def load_training_settings(path: str | Path):
    """(ModelConfig or None, TrainingConfig) from a full recipe or from a settings file such as training/gpu.yaml."""
    from ethos.recipe import ModelConfig, TrainingConfig, load_recipe

    path = Path(path)
    raw = read_yaml(path, "recipe", "give a recipe or a settings file such as training/gpu.yaml")
    if not isinstance(raw, dict):
        raise EthosError(f"{path}: a recipe is a YAML mapping with a `training:` section")
    if "sources" in raw or "constitutions" in raw:  # a full recipe: validate all of it
        recipe = load_recipe(path)
        return recipe.model, recipe.training
    extra = sorted(set(raw) - {"model", "training"})
    if extra:
        raise EthosError(f"{path}: unknown top-level keys {extra}; a settings file holds `training:` and optionally `model:`")
    if "training" not in raw:
        raise EthosError(f"{path}: no `training:` section; see training/gpu.yaml")
    model = _validate_section(ModelConfig, raw.get("model"), "model", path) if raw.get("model") is not None else None
    return model, _validate_section(TrainingConfig, raw["training"] or {}, "training", path)


def _validate_section(cls, value, section: str, path: Path):
    from pydantic import ValidationError

    try:
        return cls.model_validate(value)
    except ValidationError as exc:
        errors = exc.errors()
        where = ".".join([section, *(str(p) for p in errors[0]["loc"])])
        msg = "unknown setting" if errors[0]["type"] == "extra_forbidden" else errors[0]["msg"]
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        raise EthosError(f"{path}: {where}: {msg}{more}") from None


def train_own_data(data: str, out: str | Path, base: str | None = None, recipe: str | None = None,
                   split: str = "train", subset: str | None = None, force: bool = False, echo=print) -> dict | None:
    """Train one adapter on any chat dataset (a ``messages`` column). Returns its metrics, or None if up to date."""
    from ethos.models import resolve_model
    from ethos.recipe import ModelConfig, TrainingConfig

    from .data import read_chat_data, to_prompt_completion
    from .lora import AdapterJob, is_current, train_adapter

    model, training = load_training_settings(recipe) if recipe else (None, TrainingConfig())
    model = model or ModelConfig()
    if base:
        model = model.model_copy(update={"name": base})
    resolve_model(model.name)  # a missing local model fails here, before the data is read
    rows = to_prompt_completion(read_chat_data(data, split=split, subset=subset), data)
    out = Path(out)
    job = AdapterJob(name=out.name, rows=rows, model=model, training=training, out_dir=out,
                     meta={"data": data, "split": split, "subset": subset})
    if not _distributed_state().is_main_process:
        echo = _quiet
    if not force and is_current(job):
        echo(f"[train] {out}: up to date (same data and settings), skipped")
        return None
    return train_adapter(job, echo=echo)


# -- the command ---------------------------------------------------------------------------------------------
def configure_parser(parser) -> None:
    parser.add_argument("run_dir", nargs="?", help="a run folder: trains one adapter per dataset of the run")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="train only these datasets, e.g. deontology-narrow")
    parser.add_argument("--data", help="instead of a run: a chat dataset (CSV/JSONL/JSON/parquet file or Hub id) "
                                       "with a `messages` column")
    parser.add_argument("--out", help="with --data: the adapter folder to write")
    parser.add_argument("--base", help="with --data: base model ('embedded', a Hub id or a folder); "
                                       "default: the recipe's model, else 'embedded'")
    parser.add_argument("--recipe", help="with --data: training settings from a recipe or a settings file "
                                         "(e.g. training/gpu.yaml); default: the built-in defaults")
    parser.add_argument("--split", default="train", help="with --data and a Hub id: the split (default train)")
    parser.add_argument("--subset", help="with --data and a Hub id: the dataset config name")
    parser.add_argument("--force", action="store_true", help="retrain even when the adapter is up to date")


def run_cli(args) -> int:
    if args.data is None:
        if args.run_dir is None:
            raise EthosError("nothing to train: give a run folder (`ethos train RUN_DIR`) or `--data FILE --out DIR`")
        misplaced = [f"--{k}" for k in ("out", "base", "recipe", "subset") if getattr(args, k)]
        if misplaced:
            raise EthosError(f"{', '.join(misplaced)} go with --data; a run folder's own recipe sets its model and training")
        return _train_run_dir(args.run_dir, args.only, args.force)
    if args.run_dir is not None or args.only:
        raise EthosError("give either a run folder or --data, not both (--only selects datasets of a run)")
    if not args.out:
        raise EthosError("--data needs --out: the folder to write the adapter to")
    train_own_data(args.data, args.out, base=args.base, recipe=args.recipe, split=args.split, subset=args.subset,
                   force=args.force)
    return 0


def _train_run_dir(run_dir: str, only: list[str] | None, force: bool) -> int:
    from ethos.stages import run_stage

    store = RunStore.open(run_dir)
    recipe = store.recipe()
    state = _distributed_state()
    if not state.is_main_process:
        train_run(store, recipe, only=only, force=force)
    elif only is None:
        # The whole stage, recorded in the catalog; each adapter still skips itself when current.
        stage = dataclasses.replace(STAGE, run=lambda ctx: ctx.write("adapters", train_run(ctx.store, ctx.recipe, force=force)))
        run_stage(stage, recipe, store, force=True)
    else:
        store.write_table("adapters", train_run(store, recipe, only=only, force=force), STAGE.name)
    return 0
