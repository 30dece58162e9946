"""Stages and the runner: each stage reads tables, writes tables, and records its provenance.

A stage is skipped on re-run when its fingerprint (code version + the recipe sections it uses + the fingerprints
of the tables it reads) is unchanged and its outputs are still there.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import sys
import traceback
from dataclasses import dataclass, field
from typing import Callable

import pandas as pd

from .errors import EthosError
from .store import RunStore, code_version, now


@dataclass
class StageContext:
    """What a stage gets: the recipe, the store, and helpers that tag what it writes with its name."""

    recipe: object
    store: RunStore
    stage: str
    written: dict = field(default_factory=dict)

    def read(self, name: str) -> pd.DataFrame:
        return self.store.read_table(name)

    def write(self, name: str, frame: pd.DataFrame) -> None:
        self.store.write_table(name, frame, self.stage)
        self.written[name] = len(frame)


@dataclass(frozen=True)
class Stage:
    name: str
    description: str
    reads: tuple[str, ...]  # tables; a trailing '?' marks an optional input (e.g. audit decisions)
    writes: tuple[str, ...]  # tables it must have written when it finishes
    sections: tuple[str, ...]  # recipe sections that change its result
    run: Callable[[StageContext], None]
    # Sections that matter only under some settings (e.g. the evaluation judge when filters.judge is on).
    conditional_sections: Callable[[object], tuple[str, ...]] | None = None

    def recipe_sections(self, recipe) -> tuple[str, ...]:
        extra = self.conditional_sections(recipe) if self.conditional_sections else ()
        return self.sections + tuple(s for s in extra if s not in self.sections)

    def fingerprint(self, recipe, store: RunStore) -> tuple[str, dict]:
        inputs = {}
        for name in self.reads:
            optional = name.endswith("?")
            name = name.rstrip("?")
            fp = store.table_fingerprint(name)
            if fp is None and not optional:
                raise EthosError(f"stage {self.name!r} needs table {name!r}, which no stage has written yet: run the earlier stages first")
            inputs[name] = fp
        basis = json.dumps({"code": code_version(), "recipe": recipe.section_hash(*self.recipe_sections(recipe)), "inputs": inputs},
                           sort_keys=True)
        return hashlib.sha256(basis.encode()).hexdigest()[:16], inputs


# Ordered as `ethos run` executes them. Each entry is "module:attribute" of a Stage, imported when used so
# that `ethos --help` stays fast and each stage's heavy imports load only when it runs.
STAGE_REGISTRY = {
    "prompts": "ethos.sources:PROMPTS_STAGE",
    "categorize": "ethos.analysis.categorize:STAGE",
    "select": "ethos.analysis.select:STAGE",
    "generate": "ethos.pipelines.generate:STAGE",
    "verify": "ethos.analysis.verify:STAGE",
    "train": "ethos.training.train:STAGE",
    "evaluate": "ethos.analysis.evaluate:STAGE",
    "consistency": "ethos.analysis.consistency:STAGE",
    "report": "ethos.analysis.report:STAGE",
}


def get_stage(name: str) -> Stage:
    module, attr = STAGE_REGISTRY[name].split(":")
    return getattr(importlib.import_module(module), attr)


def stage_state(stage: Stage, recipe, store: RunStore) -> str:
    """'done', 'stale' (inputs or settings changed), 'failed', 'running' (or crashed), 'blocked' or 'pending'."""
    record = store.stage_record(stage.name)
    try:
        fingerprint, _ = stage.fingerprint(recipe, store)
    except EthosError:
        return "blocked"
    if record is None:
        return "pending"
    if record["status"] != "done":
        return record["status"]
    if record["fingerprint"] != fingerprint or not all(store.has_table(t) for t in stage.writes):
        return "stale"
    return "done"


def run_stage(stage: Stage, recipe, store: RunStore, force: bool = False, log=print) -> bool:
    """Run one stage unless it is up to date. Returns True when it ran."""
    if not force and stage_state(stage, recipe, store) == "done":
        log(f"[{stage.name}] up to date, skipped")
        return False
    fingerprint, inputs = stage.fingerprint(recipe, store)
    started = now()
    recipe_hash = recipe.section_hash(*stage.recipe_sections(recipe))
    store.record_stage(stage.name, "running", fingerprint, recipe_hash, recipe.model.name, inputs, {}, started)
    log(f"[{stage.name}] {stage.description}")
    ctx = StageContext(recipe=recipe, store=store, stage=stage.name)
    try:
        stage.run(ctx)
        missing = [t for t in stage.writes if not store.has_table(t)]
        if missing:
            raise EthosError(f"stage {stage.name!r} finished without writing {missing}")
    except BaseException as exc:
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        store.record_stage(stage.name, "failed", fingerprint, recipe_hash, recipe.model.name, inputs, ctx.written,
                           started, message)
        if not isinstance(exc, (EthosError, KeyboardInterrupt)):
            traceback.print_exc(file=sys.stderr)
        raise
    store.record_stage(stage.name, "done", fingerprint, recipe_hash, recipe.model.name, inputs, ctx.written, started)
    log(f"[{stage.name}] done: " + ", ".join(f"{k} ({v} rows)" for k, v in ctx.written.items()))
    return True


def run_pipeline(store: RunStore, only: list[str] | None = None, force: bool = False, log=print) -> None:
    recipe = store.recipe()
    names = [n for n in recipe.stages if only is None or n in only]
    for name in names:
        run_stage(get_stage(name), recipe, store, force=force, log=log)
