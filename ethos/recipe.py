"""A run is one YAML recipe, validated on load. Every section's settings live here, one class per section.

Relative paths in a recipe are relative to the recipe file's folder.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import EthosError, RecipeError
from .yamlfile import YamlSyntaxError, read_yaml


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class ModelConfig(Section):
    """The helpful-only base model: generates initial answers, and is the base the adapters train on."""

    name: str = "embedded"  # 'embedded', a Hub id, or a local folder
    dtype: Literal["bfloat16", "float16", "float32", "auto"] = "bfloat16"


class SourceConfig(Section):
    """A prompt source: a Hub dataset id, an http(s) URL, or a local CSV/JSONL/JSON/parquet file."""

    name: str = Field(pattern=r"^[A-Za-z0-9_\-]+$")
    uri: str
    role: Literal["train", "eval", "overrefusal"]
    format: Literal["auto", "csv", "jsonl", "json", "parquet"] = "auto"
    subset: str | None = None  # Hub dataset config name
    split: str = "train"  # Hub dataset split
    columns: dict[str, str]  # ours -> theirs; 'prompt' required, 'id' and 'category' optional
    label_map: str | None = None  # taxonomy mapping for the category column; defaults to the source name
    where: dict[str, list[str]] = {}  # keep rows whose column value is in the list
    limit_per_category: int | None = Field(default=None, gt=0)
    limit: int | None = Field(default=None, gt=0)

    @field_validator("columns")
    @classmethod
    def _prompt_column(cls, value: dict[str, str]) -> dict[str, str]:
        if "prompt" not in value:
            raise ValueError("missing column mapping for 'prompt': add `columns: {prompt: <their column>}`")
        unknown = sorted(set(value) - {"prompt", "id", "category"})
        if unknown:
            raise ValueError(f"unknown column roles {unknown}: use prompt, id, category")
        return value


class SplitsConfig(Section):
    narrow_categories: list[str] = ["harassment", "illegal_activity"]
    train_prompts_per_category: int | None = Field(default=None, gt=0)  # cap per category, sampled with `seed`
    seed: int = 0


class CategorizationConfig(Section):
    method: Literal["knn", "llm"] = "knn"
    embedding_model: str = "embedded-minilm"  # 'embedded-minilm' (offline all-MiniLM-L6-v2) or a sentence-transformers id
    k: int = Field(default=7, gt=0)
    min_confidence: float = Field(default=0.6, ge=0, le=1)
    # A voted category puts a prompt in a narrow set only from this confidence on. At 0.6, 14% of the prompts
    # voted into a narrow category are truly held out; at 0.9, 2% (benchmarks/results/categorization_accuracy.json).
    narrow_min_confidence: float = Field(default=0.9, ge=0, le=1)
    llm_model: str | None = None  # method 'llm': the classifier ('embedded', Hub id or folder); default model.name


class GenerationConfig(Section):
    backend: Literal["transformers", "vllm", "openai"] = "transformers"
    base_url: str | None = None  # OpenAI-compatible server (vLLM, llama.cpp, TGI)
    api_key_env: str = "OPENAI_API_KEY"  # the variable holding the key; the key itself never enters a recipe
    served_model: str | None = None  # model name on the server, if it differs from model.name
    max_new_tokens: int = Field(default=128, gt=0)
    temperature: float = Field(default=0.7, ge=0)
    top_p: float = Field(default=0.95, gt=0, le=1)
    # 16 rows per forward pass: 1.5x the tokens/s of 8 on a 2-core CPU (benchmarks/results/generation_throughput.json)
    batch_size: int = Field(default=16, gt=0)
    seed: int = 0
    ray: bool = False  # distilabel's own Ray execution for scale-out beyond one machine


class FilterConfig(Section):
    min_chars: int = Field(default=20, ge=0)
    max_repeated_ngram_fraction: float = Field(default=0.5, gt=0, le=1)
    min_edit_fraction: float = Field(default=0.05, ge=0, le=1)  # below this the revision counts as unchanged
    reject_truncated: bool = True  # revisions that hit generation.max_new_tokens go to `rejected`
    judge: bool = False  # also reject revisions the judge still rates harmful


class VerificationConfig(Section):
    ngram_size: int = Field(default=5, gt=0)
    max_ngram_jaccard: float = Field(default=0.5, gt=0, le=1)
    max_cosine: float = Field(default=0.9, gt=0, le=1)
    stop_on_failure: bool = True


class AuditConfig(Section):
    include_broad: bool = False  # also push the broad sets (their flags remove samples from the narrow sets too)
    top_leak_candidates: int = Field(default=20, ge=0)  # the samples the automatic checks rate likeliest to leak
    random_samples: int = Field(default=20, ge=0)  # a seeded random draw: the unbiased leak-rate estimate
    review_prompts: int = Field(default=50, ge=0)  # doubtful prompts offered for category review, likeliest first
    workspace: str = Field(default="ethos", pattern=r"^[A-Za-z0-9_\-]+$")  # Argilla's rule for workspace names


class TrainingConfig(Section):
    """LoRA fine-tuning with TRL's SFTTrainer (see training/README.md; training/gpu.yaml is the GPU recipe)."""

    lora_r: int = Field(default=8, gt=0)
    lora_alpha: int = Field(default=16, gt=0)
    lora_dropout: float = Field(default=0.05, ge=0, lt=1)
    use_rslora: bool = False
    target_modules: list[str] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    learning_rate: float = Field(default=2e-4, gt=0)
    lr_scheduler_type: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "linear"
    warmup_steps: int = Field(default=0, ge=0)
    weight_decay: float = Field(default=0.0, ge=0)
    num_train_epochs: float = Field(default=1.0, gt=0)
    max_steps: int = -1  # >0 overrides epochs
    per_device_train_batch_size: int = Field(default=4, gt=0)
    gradient_accumulation_steps: int = Field(default=1, gt=0)
    max_length: int = Field(default=512, gt=0)
    bf16: bool = False
    gradient_checkpointing: bool = False
    save_steps: int = Field(default=50, gt=0)  # checkpoint interval: an interrupted run resumes from the last one
    seed: int = 0


class EvaluationConfig(Section):
    """Safety benchmark, persona diagnostic and projectability (see analysis/judge.py, persona.py, stats.py)."""

    judge: Literal["embedded", "openai"] = "embedded"  # rule-based (no extra model), or an OpenAI-compatible server
    judge_base_url: str | None = None
    judge_model: str | None = None
    judge_api_key_env: str = "OPENAI_API_KEY"
    # How the judge's replies read: 'labels' (a general model answering our rubric), 'llama_guard' ("safe" /
    # "unsafe\nS1"), 'harmbench' (HarmBench's classifier, "Yes"/"No"); 'auto' picks by the model's name.
    judge_format: Literal["auto", "labels", "llama_guard", "harmbench"] = "auto"
    judge_workers: int = Field(default=8, gt=0)  # concurrent requests to the judge server
    prompts_per_category: int | None = Field(default=None, gt=0)
    overrefusal_prompts: int | None = Field(default=None, gt=0)
    max_new_tokens: int = Field(default=96, gt=0)
    batch_size: int = Field(default=8, gt=0)
    persona_files: dict[str, str] = {}  # dimension -> JSONL path, Hub id or URL (persona-eval format)
    persona_statements: int | None = Field(default=None, gt=0)  # per dimension, balanced over Yes/No-keyed
    bootstrap: int = Field(default=1000, gt=0)
    confidence: float = Field(default=0.95, gt=0, lt=1)
    seed: int = 0

    @model_validator(mode="after")
    def _judge_server(self) -> "EvaluationConfig":
        if self.judge == "openai" and not (self.judge_base_url and self.judge_model):
            raise ValueError("judge 'openai' needs judge_base_url (e.g. http://localhost:8000/v1) and judge_model")
        return self


class ConsistencyConfig(Section):
    """Persona consistency (ethos.analysis.consistency); the metrics are defined in CONSISTENCY_DEFINITIONS."""

    enabled: bool = True
    items: str | None = None  # folder of item-set YAML files; default datasets/consistency
    questions: int | None = Field(default=None, gt=0)  # use the first N open questions (all when unset)
    paraphrases: int = Field(default=2, gt=0)  # paraphrases asked per question
    samples_per_question: int = Field(default=2, gt=0)  # sampled answers per paraphrase
    max_new_tokens: int = Field(default=96, gt=0)
    temperature: float = Field(default=1.0, ge=0)  # answers are sampled, as in the emergent-misalignment studies
    batch_size: int = Field(default=8, gt=0)
    judge: str = "embedded"  # 'openai' (the endpoint below), or a local model: 'embedded', a Hub id or a folder
    judge_base_url: str | None = None
    judge_model: str | None = None
    judge_api_key_env: str = "OPENAI_API_KEY"
    judge_concurrency: int = Field(default=8, gt=0)  # parallel requests to the endpoint
    # A local model's reply starts with this text before it gives a number; small models then answer with a
    # number far more often. '' reads the very first generated token, as the endpoint judge does.
    number_prefix: str = "Score:"
    min_number_mass: float = Field(default=0.25, gt=0, le=1)  # less probability on numbers: no score
    min_coherence: float = Field(default=50, ge=0, le=100)  # answers judged less coherent do not count
    label_threshold: float = Field(default=0.5, gt=0, lt=1)  # misalignment (0-1) splitting aligned from misaligned
    bootstrap: int = Field(default=1000, gt=0)
    seed: int = 0

    @model_validator(mode="after")
    def _endpoint_needs_url(self):
        if self.judge == "openai" and not (self.judge_base_url and self.judge_model):
            raise ValueError("judge 'openai' needs judge_base_url (e.g. http://localhost:8000/v1) and judge_model")
        return self


class PublishConfig(Section):
    namespace: str | None = None
    license: str = "cc-by-4.0"
    private: bool = False
    dataset_repo: str | None = None  # default: <namespace>/ethos-<run name>
    base_model: str | None = None  # Hub id for the model cards when model.name is a local folder


STAGE_NAMES = ("prompts", "categorize", "select", "generate", "verify", "train", "evaluate", "consistency", "report")


class Recipe(Section):
    name: str = Field(pattern=r"^[A-Za-z0-9_\-\.]+$")
    description: str = ""
    seed: int = 0
    model: ModelConfig = ModelConfig()
    constitutions: list[str] = Field(min_length=1)
    taxonomy: str | None = None  # path; default datasets/taxonomy.yaml
    sources: list[SourceConfig] = Field(min_length=1)
    splits: SplitsConfig = SplitsConfig()
    categorization: CategorizationConfig = CategorizationConfig()
    generation: GenerationConfig = GenerationConfig()
    filters: FilterConfig = FilterConfig()
    verification: VerificationConfig = VerificationConfig()
    audit: AuditConfig = AuditConfig()
    training: TrainingConfig = TrainingConfig()
    evaluation: EvaluationConfig = EvaluationConfig()
    consistency: ConsistencyConfig = ConsistencyConfig()
    publish: PublishConfig = PublishConfig()
    stages: list[Literal[STAGE_NAMES]] = list(STAGE_NAMES)  # type: ignore[valid-type]

    # Set by load_recipe: the folder relative paths are resolved against.
    base_dir: Path = Field(default=Path("."), exclude=True)

    def resolve_path(self, value: str) -> Path:
        path = Path(value).expanduser()
        return path if path.is_absolute() else (self.base_dir / path).resolve()

    def section_hash(self, *sections: str) -> str:
        """Hash of the named sections (the whole recipe when none are named), for stage fingerprints."""
        data = self.model_dump(mode="json")
        picked = {k: data[k] for k in sections} if sections else data
        return hashlib.sha256(json.dumps(picked, sort_keys=True).encode()).hexdigest()[:16]

    def taxonomy_obj(self):
        from .taxonomy import load_taxonomy

        return load_taxonomy(self.resolve_path(self.taxonomy) if self.taxonomy else None)

    def held_out_categories(self) -> list[str]:
        """The taxonomy's categories outside splits.narrow_categories: the ones narrow sets must never hold."""
        narrow = set(self.splits.narrow_categories)
        return [c for c in self.taxonomy_obj().categories if c not in narrow]

    def dataset_names(self) -> list[str]:
        """The SFT sets of this run: one per constitution and scope."""
        return [f"{c}-{scope}" for c in self.constitution_names() for scope in ("broad", "narrow")]

    def constitution_names(self) -> list[str]:
        from .constitutions import constitution_path

        return [constitution_path(c).stem for c in self.constitutions]


def _format_loc(loc) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def _resolve(base_dir: Path, value: str) -> Path:
    path = Path(value).expanduser()
    return path if path.is_absolute() else (base_dir / path).resolve()


def _reference_problems(raw: dict, base_dir: Path) -> list[str]:
    """Checks against files (constitutions, taxonomy categories), run on the raw YAML so they are reported
    together with schema problems."""
    from .constitutions import load_constitution
    from .taxonomy import load_taxonomy

    problems = []
    constitutions = raw.get("constitutions")
    for i, ref in enumerate(constitutions if isinstance(constitutions, list) else []):
        if not isinstance(ref, str):
            continue
        try:
            load_constitution(str(_resolve(base_dir, ref)) if ref.endswith((".yaml", ".yml")) else ref)
        except EthosError as exc:
            problems.append(f"constitutions[{i}]: {exc}")
    taxonomy_ref = raw.get("taxonomy")
    try:
        taxonomy = load_taxonomy(_resolve(base_dir, taxonomy_ref) if isinstance(taxonomy_ref, str) else None)
    except EthosError as exc:
        return problems + [f"taxonomy: {exc}"]
    splits = raw.get("splits") if isinstance(raw.get("splits"), dict) else {}
    narrow = splits.get("narrow_categories")
    for i, cat in enumerate(narrow if isinstance(narrow, list) else []):
        if cat not in taxonomy.categories:
            problems.append(f"splits.narrow_categories[{i}]: unknown category {cat!r}; known: {sorted(taxonomy.categories)}")
    sources = raw.get("sources")
    for i, source in enumerate(sources if isinstance(sources, list) else []):
        if not isinstance(source, dict):
            continue
        columns = source.get("columns") if isinstance(source.get("columns"), dict) else {}
        if "category" in columns:
            mapping = source.get("label_map") or source.get("name")
            if mapping not in taxonomy.mappings and mapping != "taxonomy":
                problems.append(f"sources[{i}].label_map: no taxonomy mapping {mapping!r}; known: {sorted(taxonomy.mappings)} or 'taxonomy'")
        uri = source.get("uri")
        if isinstance(uri, str) and "://" not in uri and (uri.startswith((".", "/", "~")) or Path(uri).suffix):
            if not _resolve(base_dir, uri).exists():
                problems.append(f"sources[{i}].uri: file {uri} not found (relative paths start at the recipe's folder)")
    return problems


def _model_problems(recipe: Recipe) -> list[str]:
    """Checks across sections of a schema-valid recipe."""
    problems = []
    names = [s.name for s in recipe.sources]
    for i, source in enumerate(recipe.sources):
        if names.count(source.name) > 1:
            problems.append(f"sources[{i}].name: duplicate source name {source.name!r}")
    if recipe.generation.backend == "openai" and not recipe.generation.base_url:
        problems.append("generation.base_url: the openai backend needs the server's URL, e.g. http://localhost:8000/v1")
    if not any(s.role == "train" for s in recipe.sources):
        problems.append("sources: no source has role 'train'; add one to generate training data from")
    return problems


def parse_recipe(raw: object, source: str, base_dir: Path) -> Recipe:
    if not isinstance(raw, dict):
        raise RecipeError(source, ["(top level): a recipe is a YAML mapping of sections"])
    problems = []
    recipe = None
    try:
        recipe = Recipe.model_validate({**raw, "base_dir": base_dir})
    except ValidationError as exc:
        for err in exc.errors():
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                msg = "unknown setting (check the spelling against datasets/recipes/demo.yaml)"
            problems.append(f"{_format_loc(err['loc'])}: {msg}")
    problems += _reference_problems(raw, base_dir)
    if recipe is not None:
        problems += _model_problems(recipe)
    if problems:
        raise RecipeError(source, problems)
    return recipe


def load_recipe(path: str | Path) -> Recipe:
    path = Path(path)
    try:
        raw = read_yaml(path, "recipe", "give a YAML file, e.g. datasets/recipes/demo.yaml")
    except YamlSyntaxError as exc:
        raise RecipeError(str(path), [f"not valid YAML: {exc.detail}"]) from None
    return parse_recipe(raw, str(path), path.resolve().parent)
