"""The evaluate stage: the base model and every adapter answer the evaluation prompts, a judge labels the answers,
and each model is scored on the persona statements.

Generation is greedy and batched. Work is saved per model and per step (responses, judgements, persona scores)
under ``<run>/evaluate/parts/`` with a key of everything that determines it, so a crash or an interrupt loses at
most the model in progress, and changing only the judge re-judges without regenerating. The tables are merged
from the parts at the end; parts of older settings are deleted then.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import pandas as pd

from ethos.errors import EthosError
from ethos.store import atomic_path
from ethos.stages import Stage, StageContext

log = logging.getLogger(__name__)

BASE = "base"
EVAL_PROMPT_COLUMNS = ["prompt_id", "prompt", "source", "category", "role", "scope"]
RESPONSE_COLUMNS = ["model", "prompt_id", "prompt", "category", "role", "scope", "response"]
JUDGEMENT_COLUMNS = RESPONSE_COLUMNS + ["label", "harmful", "judge", "judge_detail"]


# -- what to evaluate ---------------------------------------------------------------------------------------
def select_eval_prompts(frame: pd.DataFrame, evaluation) -> pd.DataFrame:
    """The evaluation prompts after the recipe's caps: ``prompts_per_category`` harmful prompts per category and
    ``overrefusal_prompts`` safe prompts, each a seeded sample (the same prompts for every model)."""
    missing = [c for c in EVAL_PROMPT_COLUMNS if c not in frame.columns]
    if missing:
        raise EthosError(f"table eval_prompts lacks columns {missing}: re-run the select stage (`ethos run RECIPE --out DIR --only select`)")
    unknown = sorted(set(frame["role"]) - {"eval", "overrefusal"})
    if unknown:
        raise EthosError(f"eval_prompts has unknown roles {unknown}: roles must be eval or overrefusal; re-run the select stage")
    frame = frame.sort_values("prompt_id").reset_index(drop=True)
    harmful = frame[frame["role"] == "eval"]
    if evaluation.prompts_per_category:
        shuffled = harmful.sample(frac=1.0, random_state=evaluation.seed)
        harmful = shuffled.groupby("category", sort=False).head(evaluation.prompts_per_category)
    safe = frame[frame["role"] == "overrefusal"]
    if evaluation.overrefusal_prompts and len(safe) > evaluation.overrefusal_prompts:
        safe = safe.sample(evaluation.overrefusal_prompts, random_state=evaluation.seed)
    picked = pd.concat([harmful, safe]).sort_values("prompt_id").reset_index(drop=True)
    if picked.empty:
        raise EthosError("no evaluation prompts: give the recipe a source with role eval or overrefusal and re-run prompts/select")
    return picked


def models_to_evaluate(adapters: pd.DataFrame, run_root: Path) -> list[tuple[str, Path | None]]:
    """('base', None) then (adapter name, adapter folder) for every adapter of the run."""
    models: list[tuple[str, Path | None]] = [(BASE, None)]
    for row in adapters.sort_values("name").itertuples():
        path = (run_root / row.path).resolve()
        if not (path / "adapter_config.json").exists():
            raise EthosError(f"adapter {row.name!r} missing at {path}: re-run the train stage (`ethos run RECIPE --out {run_root} --only train`)")
        if row.name == BASE:
            raise EthosError("an adapter is named 'base', which is reserved for the base model: rename it")
        models.append((row.name, path))
    return models


# -- saved parts --------------------------------------------------------------------------------------------
def _digest(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _adapter_digest(path: Path | None) -> str:
    if path is None:
        return "none"
    from ethos.store import file_sha256

    weights = sorted(path.glob("adapter_model.*"))
    return _digest([file_sha256(p) for p in weights], (path / "adapter_config.json").read_text())


class Parts:
    """Per-model intermediate tables, written atomically; a part is valid only under the key it was made with."""

    def __init__(self, root: Path):
        self.root = root
        self.kept: set[Path] = set()

    def path(self, model: str, kind: str, key: str) -> Path:
        return self.root / f"{model}.{kind}.{key}.parquet"

    def load(self, model: str, kind: str, key: str) -> pd.DataFrame | None:
        path = self.path(model, kind, key)
        self.kept.add(path)
        return pd.read_parquet(path) if path.exists() else None

    def save(self, model: str, kind: str, key: str, frame: pd.DataFrame) -> pd.DataFrame:
        path = self.path(model, kind, key)
        with atomic_path(path) as tmp:
            frame.reset_index(drop=True).to_parquet(tmp, index=False)
        self.kept.add(path)
        return frame

    def remove_stale(self) -> None:
        for path in self.root.glob("*.parquet"):
            if path not in self.kept:
                path.unlink()


# -- the stage ------------------------------------------------------------------------------------------------
class _ModelSwitcher:
    """Loads the base model once and puts one adapter at a time on top of it (cheap even for large bases)."""

    def __init__(self, ref: str, dtype: str):
        self.ref, self.dtype = ref, dtype
        self.base = self.tokenizer = None

    def get(self, adapter: Path | None):
        from ethos.models import load_causal_lm

        if self.base is None:
            self.base, self.tokenizer = load_causal_lm(self.ref, dtype=self.dtype)
        if adapter is None:
            return self.base, self.tokenizer
        from peft import PeftModel

        return PeftModel.from_pretrained(self.base, str(adapter)).eval(), self.tokenizer

    def release(self, model) -> None:
        if model is not self.base:
            self.base = model.unload()  # removes the LoRA layers, leaving the untouched base weights


def _run(ctx: StageContext) -> None:
    from tqdm.auto import tqdm

    from ethos.models import chat_generate

    from .judge import judge_from_config
    from .persona import load_persona_dimensions, score_model_on

    recipe, store = ctx.recipe, ctx.store
    ev = recipe.evaluation
    prompts = select_eval_prompts(ctx.read("eval_prompts"), ev)
    models = models_to_evaluate(ctx.read("adapters"), store.root)
    statements = load_persona_dimensions(ev.persona_files, ev.persona_statements, ev.seed, recipe.base_dir)
    judge = judge_from_config(ev)
    parts = Parts(store.root / "evaluate" / "parts")
    switcher = _ModelSwitcher(recipe.model.name, recipe.model.dtype)
    prompt_key = _digest(prompts[["prompt_id", "prompt"]].values.tolist())
    statement_key = _digest(statements[["statement_id", "question"]].values.tolist())
    judge_key = _digest(judge.name, ev.judge_base_url)
    log.info("evaluating %d models on %d prompts and %d persona statements (judge: %s)",
             len(models), len(prompts), len(statements), judge.name)

    responses, judgements, persona = [], [], []
    for number, (name, adapter) in enumerate(models, start=1):
        model_key = _digest(recipe.model.model_dump(), _adapter_digest(adapter))
        gen_key = _digest(model_key, prompt_key, ev.max_new_tokens)
        persona_key = _digest(model_key, statement_key)
        answered = parts.load(name, "responses", gen_key)
        scored = parts.load(name, "persona", persona_key)
        model = None
        if answered is None or scored is None:
            model, tokenizer = switcher.get(adapter)
        if answered is None:
            conversations = [[{"role": "user", "content": p}] for p in prompts["prompt"]]
            with tqdm(total=len(prompts), desc=f"[{number}/{len(models)}] {name}: answering", unit="prompt") as bar:
                out = chat_generate(model, tokenizer, conversations, max_new_tokens=ev.max_new_tokens,
                                    temperature=0.0, batch_size=ev.batch_size, seed=ev.seed, progress=bar)
            answered = parts.save(name, "responses", gen_key, prompts.assign(
                model=name, response=[o["text"] for o in out])[RESPONSE_COLUMNS])
        if scored is None:
            with tqdm(total=len(statements), desc=f"[{number}/{len(models)}] {name}: persona", unit="statement") as bar:
                scored = parts.save(name, "persona", persona_key,
                                    score_model_on(model, tokenizer, name, statements, ev.batch_size, progress=bar))
        if model is not None:
            switcher.release(model)
        judged = parts.load(name, "judgements", _digest(gen_key, judge_key))
        if judged is None:
            with tqdm(total=len(answered), desc=f"[{number}/{len(models)}] {name}: judging", unit="pair") as bar:
                verdicts = judge.judge(answered["prompt"].tolist(), answered["response"].tolist(),
                                       answered["role"].tolist(), progress=bar)
            judged = parts.save(name, "judgements", _digest(gen_key, judge_key), answered.assign(
                label=[v.label for v in verdicts], harmful=[v.harmful for v in verdicts],
                judge=[v.judge for v in verdicts], judge_detail=[v.detail for v in verdicts]))
        responses.append(answered)
        judgements.append(judged)
        persona.append(scored)

    ctx.write("eval_responses", pd.concat(responses, ignore_index=True)[RESPONSE_COLUMNS])
    ctx.write("eval_judgements", pd.concat(judgements, ignore_index=True)[JUDGEMENT_COLUMNS])
    ctx.write("persona_scores", pd.concat(persona, ignore_index=True))
    parts.remove_stale()


STAGE = Stage(
    name="evaluate",
    description="answer the evaluation prompts with the base model and every adapter, judge, score personas",
    reads=("eval_prompts", "adapters"),
    writes=("eval_responses", "eval_judgements", "persona_scores"),
    sections=("model", "evaluation"),
    run=_run,
)
