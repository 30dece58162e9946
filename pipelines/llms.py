"""The LLMs the generation pipeline can use, one per recipe backend.

- ``transformers`` (default): :class:`TransformersChatLLM`, our distilabel LLM over ``ethos.models`` (the embedded
  model, a Hub id or a local folder), with real batched generation and each reply's finish reason.
- ``vllm``: distilabel's ``vLLM`` for GPUs.
- ``openai``: distilabel's ``OpenAILLM`` against any OpenAI-compatible server (vLLM server, llama.cpp server, TGI).

distilabel's ``InferenceEndpointsLLM`` is deliberately not offered: with huggingface_hub 2.x it yields ``None``
for every generation without raising.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import urllib.error
import urllib.request
from typing import Any, List

from distilabel.models.llms.base import LLM
from pydantic import Field, PrivateAttr

from ethos.errors import EthosError


def _common_prefix(a: List[int], b: List[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _prefix_groups(token_ids: List[List[int]], min_prefix: int) -> List[tuple]:
    """Rows grouped by a shared token prefix of at least ``min_prefix``: [(prefix_len, [row indices])]."""
    order = sorted(range(len(token_ids)), key=lambda i: token_ids[i])
    groups: List[tuple] = []
    for i in order:
        if groups:
            p, rows = groups[-1]
            shared = min(p, _common_prefix(token_ids[rows[0]], token_ids[i]))
            if shared >= min_prefix:
                groups[-1] = (shared, rows + [i])
                continue
        groups.append((len(token_ids[i]), [i]))
    # Every row keeps at least one token of its own after the prefix (generation starts from it).
    return [(min(p, min(len(token_ids[r]) for r in rows) - 1) if len(rows) > 1 else 0, rows) for p, rows in groups]


def shared_prefix_generate(model, tokenizer, conversations, *, max_new_tokens: int, temperature: float, top_p: float,
                           seed: int, batch_size: int, prefix_cache: dict, min_prefix: int = 64) -> List[dict]:
    """Like ``ethos.models.chat_generate``, but rows sharing a long prompt prefix reuse its key/value cache.

    Critique and revision prompts start with the constitution's few-shot examples (hundreds of tokens, the same
    for every row of a constitution); on a CPU, encoding them again for every row costs more than generating.
    Here each distinct prefix is encoded once per process (kept in ``prefix_cache``) and copied into each batch;
    the rows' own suffixes are left-padded after it. Rows without a long shared prefix go through chat_generate.
    """
    import copy

    import torch

    from ethos.models import chat_generate, decode_reply, render_chat, sampling_kwargs

    texts = render_chat(tokenizer, conversations)
    token_ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    results: List[Any] = [None] * len(texts)
    torch.manual_seed(seed)
    sampling = sampling_kwargs(temperature, top_p)
    for prefix_len, rows in _prefix_groups(token_ids, min_prefix):
        if prefix_len < min_prefix:
            plain = chat_generate(model, tokenizer, [conversations[i] for i in rows], max_new_tokens=max_new_tokens,
                                  temperature=temperature, top_p=top_p, seed=seed, batch_size=batch_size)
            for i, r in zip(rows, plain):
                results[i] = r
            continue
        prefix = token_ids[rows[0]][:prefix_len]
        key = hashlib.sha256(json.dumps(prefix).encode()).hexdigest()
        if key not in prefix_cache:
            with torch.inference_mode():
                out = model(input_ids=torch.tensor([prefix], device=model.device), use_cache=True)
            if len(prefix_cache) >= 8:
                prefix_cache.pop(next(iter(prefix_cache)))
            prefix_cache[key] = out.past_key_values
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            suffixes = [token_ids[i][prefix_len:] for i in chunk]
            width = max(len(x) for x in suffixes)
            pad = tokenizer.pad_token_id
            ids = torch.tensor([prefix + [pad] * (width - len(x)) + x for x in suffixes], device=model.device)
            mask = torch.tensor([[1] * prefix_len + [0] * (width - len(x)) + [1] * len(x) for x in suffixes],
                                device=model.device)
            cache = copy.deepcopy(prefix_cache[key])
            cache.batch_repeat_interleave(len(chunk))
            with torch.inference_mode():
                out = model.generate(input_ids=ids, attention_mask=mask, past_key_values=cache,
                                     max_new_tokens=max_new_tokens, pad_token_id=pad, **sampling)
            new = out[:, ids.shape[1]:]
            for row, i in enumerate(chunk):
                results[i] = decode_reply(tokenizer, new[row].tolist())
    return results


def step_threads() -> int:
    """Torch threads for each model-holding step process: ETHOS_TORCH_THREADS, else the cores shared by three steps.

    The three generation steps run at once, each in its own process. Giving each all the cores oversubscribes
    them, and OpenMP's spinning threads then stall each other: on a busy 2-core machine one thread per step was
    16x faster than two (2 s against 33 s for the same batch).
    """
    value = os.environ.get("ETHOS_TORCH_THREADS")
    if value:
        try:
            return max(1, int(value))
        except ValueError:
            raise EthosError(f"ETHOS_TORCH_THREADS={value!r} is not a whole number: unset it or give e.g. 2") from None
    return max(1, (os.cpu_count() or 1) // 3)


class TransformersChatLLM(LLM):
    """A chat model run in-process through ``ethos.models.load_causal_lm`` and ``chat_generate``.

    Prompts that share a long prefix (a constitution's few-shot examples) reuse its key/value cache
    (:func:`shared_prefix_generate`), which makes critique and revision several times cheaper on a CPU.

    Besides token counts, its statistics carry each reply's ``finish_reason`` ('stop' or 'length') so quality
    filters can reject truncated replies. Sampling is seeded per batch from the batch's content, so a batch that
    is recomputed after a crash gets the same replies.
    """

    model: str = Field(description="'embedded', a Hub id or a local model folder")
    dtype: str = "bfloat16"
    batch_size: int = 8
    seed: int = 0

    _model: Any = PrivateAttr(None)
    _tokenizer: Any = PrivateAttr(None)
    _prefix_cache: dict = PrivateAttr(default_factory=dict)

    def load(self) -> None:
        super().load()
        import torch

        from ethos.models import load_causal_lm

        torch.set_num_threads(step_threads())
        self._model, self._tokenizer = load_causal_lm(self.model, dtype=self.dtype)

    def unload(self) -> None:
        self._model = self._tokenizer = None
        self._prefix_cache = {}

    @property
    def model_name(self) -> str:
        from ethos.models import model_id

        return model_id(self.model)

    def _batch_seed(self, inputs: List[Any], generation: int) -> int:
        basis = json.dumps([self.seed, generation, inputs], sort_keys=True)
        return int.from_bytes(hashlib.sha256(basis.encode()).digest()[:4], "big")

    def generate(
        self,
        inputs: List[Any],
        num_generations: int = 1,
        max_new_tokens: int = 128,
        temperature: float = 0.7,
        top_p: float = 0.95,
    ) -> List[dict]:
        from ethos.models import render_chat

        started = time.perf_counter()
        runs = [
            shared_prefix_generate(self._model, self._tokenizer, inputs, max_new_tokens=max_new_tokens,
                                   temperature=temperature, top_p=top_p, seed=self._batch_seed(inputs, g),
                                   batch_size=self.batch_size, prefix_cache=self._prefix_cache)
            for g in range(num_generations)
        ]
        prompt_tokens = [len(self._tokenizer(t, add_special_tokens=False)["input_ids"]) for t in render_chat(self._tokenizer, inputs)]
        outputs = []
        for i, n_in in enumerate(prompt_tokens):
            replies = [run[i] for run in runs]
            outputs.append({
                "generations": [r["text"] for r in replies],
                "statistics": {
                    "input_tokens": [n_in] * len(replies),
                    "output_tokens": [r["new_tokens"] for r in replies],
                    "finish_reason": [r["finish_reason"] for r in replies],
                },
            })
        new_tokens = sum(r["new_tokens"] for run in runs for r in run)
        elapsed = time.perf_counter() - started
        self._logger.info(f"generated {len(inputs) * num_generations} replies, {new_tokens} tokens in {elapsed:.1f} s "
                          f"({new_tokens / max(elapsed, 1e-9):.0f} tok/s)")
        return outputs


def generation_kwargs(generation) -> dict:
    """The sampling settings every backend's ``generate`` accepts under these names."""
    return {"max_new_tokens": generation.max_new_tokens, "temperature": generation.temperature, "top_p": generation.top_p}


def check_openai_server(base_url: str, api_key: str | None, timeout: float = 5.0) -> None:
    """Fail fast, with one line, when the OpenAI-compatible server is not answering."""
    request = urllib.request.Request(base_url.rstrip("/") + "/models")
    if api_key:
        request.add_header("Authorization", f"Bearer {api_key}")
    try:
        with urllib.request.urlopen(request, timeout=timeout):
            pass
    except urllib.error.HTTPError as exc:
        if exc.code in (401, 403):
            raise EthosError(f"server at {base_url} refused the API key ({exc.code}): set the variable named by generation.api_key_env") from None
        # Some servers do not list models; any HTTP answer means the server is up.
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise EthosError(f"no OpenAI-compatible server answering at {base_url} ({reason}): start it or fix generation.base_url") from None


def build_llm(recipe) -> LLM:
    """The distilabel LLM for the recipe's ``generation.backend`` (checked to be usable before the pipeline starts)."""
    from ethos.models import resolve_model

    gen, model = recipe.generation, recipe.model
    kwargs = generation_kwargs(gen)
    if gen.backend == "transformers":
        resolve_model(model.name)  # a missing folder fails here with one line, not inside a worker process
        return TransformersChatLLM(model=model.name, dtype=model.dtype, batch_size=gen.batch_size, seed=gen.seed,
                                   generation_kwargs=kwargs)
    if gen.backend == "vllm":
        try:
            import vllm  # noqa: F401
        except ImportError:
            raise EthosError("generation.backend 'vllm' needs vLLM on a GPU machine: pip install vllm (or use backend: transformers)") from None
        from distilabel.models.llms import vLLM

        return vLLM(model=resolve_model(model.name), dtype="auto" if model.dtype == "auto" else model.dtype, seed=gen.seed,
                    generation_kwargs=kwargs)
    if gen.backend == "openai":
        try:
            import openai  # noqa: F401
        except ImportError:
            raise EthosError("generation.backend 'openai' needs the openai package: pip install openai") from None
        from distilabel.models.llms import OpenAILLM

        # Local servers (llama.cpp, vLLM, TGI) usually take any key; the client still needs a non-empty one.
        api_key = os.environ.get(gen.api_key_env) or "no-key"
        check_openai_server(gen.base_url, api_key)
        return OpenAILLM(model=gen.served_model or model.name, base_url=gen.base_url, api_key=api_key,
                         generation_kwargs=kwargs)
    raise EthosError(f"unknown generation.backend {gen.backend!r}: use transformers, vllm or openai")
