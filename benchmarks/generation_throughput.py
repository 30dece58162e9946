"""Generation throughput: our embedded path (transformers, bf16, batched) against llama.cpp on the same GGUF.

    .venv/bin/python -m benchmarks.generation_throughput [--prompts 32] [--max-new-tokens 64] [--batch-sizes 8 16 32]

Both sides answer the same HarmBench prompts (read from ../shared/data) with the same sampling settings and
token budget. Ours is ``ethos.models.chat_generate`` on the bf16 model dequantised from the embedded GGUF (the
generate stage's initial-answer path), at each of ``--batch-sizes``; the headline ratio is taken at the recipe's
default ``generation.batch_size``. llama.cpp is llama-cpp-python decoding that GGUF file itself at batch 1, one
request after another, as a llama.cpp server would for a single client.

llama-cpp-python is not a project dependency (it builds llama.cpp from source, about ten minutes here). It is
looked for in a separate venv, ``.cache/bench-venv`` (override with ETHOS_BENCH_PYTHON=/path/to/python):

    python -m venv .cache/bench-venv && .cache/bench-venv/bin/pip install llama-cpp-python

Without it the llama.cpp side is reported as unavailable. Results: benchmarks/results/generation_throughput.json.
The issue's target is at least 1.5x llama.cpp's tokens/s. This machine is shared, so the load average at the
start and end is recorded with the figures, and the two sides run alternately (``--repeats``, median reported).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from ethos.paths import PROJECT_ROOT
from ethos.recipe import GenerationConfig
from ethos.store import write_json

RESULTS = PROJECT_ROOT / "benchmarks" / "results" / "generation_throughput.json"
HARMBENCH = PROJECT_ROOT.parent / "shared" / "data" / "harmbench" / "harmbench_behaviors_text_all.csv"
BENCH_PYTHON = Path(os.environ.get("ETHOS_BENCH_PYTHON") or PROJECT_ROOT / ".cache" / "bench-venv" / "bin" / "python")
TARGET_RATIO = 1.5

# Runs inside the bench venv: reads {gguf, prompts, max_new_tokens, temperature, top_p, threads} on stdin.
_LLAMA_SCRIPT = r"""
import json, sys, time
from llama_cpp import Llama
cfg = json.load(sys.stdin)
llm = Llama(model_path=cfg["gguf"], n_ctx=2048, n_threads=cfg["threads"], n_batch=512, verbose=False, seed=0)
llm.create_chat_completion([{"role": "user", "content": "Hello"}], max_tokens=4)  # warm-up
tokens, started = 0, time.perf_counter()
for prompt in cfg["prompts"]:
    out = llm.create_chat_completion([{"role": "user", "content": prompt}], max_tokens=cfg["max_new_tokens"],
                                     temperature=cfg["temperature"], top_p=cfg["top_p"])
    tokens += out["usage"]["completion_tokens"]
elapsed = time.perf_counter() - started
import llama_cpp
print(json.dumps({"new_tokens": tokens, "seconds": elapsed, "version": llama_cpp.__version__}))
"""


def load_prompts(n: int) -> list[str]:
    import pandas as pd

    if not HARMBENCH.exists():
        sys.exit(f"benchmark data missing: {HARMBENCH} (the public data beside the clone, see ../shared/data/README.md)")
    frame = pd.read_csv(HARMBENCH)
    frame = frame[frame["FunctionalCategory"] == "standard"].sort_values("BehaviorID")
    return frame["Behavior"].head(n).tolist()


def load_embedded():
    from ethos.models import chat_generate, load_causal_lm

    model, tokenizer = load_causal_lm("embedded", dtype="bfloat16")
    chat_generate(model, tokenizer, [[{"role": "user", "content": "Hello"}]] * 2, max_new_tokens=4, batch_size=2)  # warm-up
    return model, tokenizer


def run_embedded(model, tokenizer, prompts: list[str], args, batch_size: int) -> dict:
    import torch

    from ethos.models import chat_generate

    conversations = [[{"role": "user", "content": p}] for p in prompts]
    started = time.perf_counter()
    results = chat_generate(model, tokenizer, conversations, max_new_tokens=args.max_new_tokens,
                            temperature=args.temperature, top_p=args.top_p, seed=0, batch_size=batch_size)
    elapsed = time.perf_counter() - started
    tokens = sum(r["new_tokens"] for r in results)
    return {"backend": "transformers (ethos.models.chat_generate)", "dtype": "bfloat16", "batch_size": batch_size,
            "torch": torch.__version__, "threads": torch.get_num_threads(), "new_tokens": tokens,
            "seconds": round(elapsed, 2), "tokens_per_s": round(tokens / elapsed, 1),
            "samples_per_min": round(len(prompts) / elapsed * 60, 1)}


def summarise(runs: list[dict]) -> dict:
    """The median run by tokens/s, with every run's figure (the machine is shared: single runs swing widely)."""
    ordered = sorted(runs, key=lambda r: r["tokens_per_s"])
    return {**ordered[len(ordered) // 2], "runs_tokens_per_s": [r["tokens_per_s"] for r in runs]}


def run_llama_cpp(prompts: list[str], args) -> dict:
    from ethos.models import _embedded_gguf

    if not BENCH_PYTHON.exists():
        return {"available": False, "reason": f"no bench venv at {BENCH_PYTHON}: create it and pip install llama-cpp-python (see this script's docstring)"}
    cfg = {"gguf": str(_embedded_gguf()), "prompts": prompts, "max_new_tokens": args.max_new_tokens,
           "temperature": args.temperature, "top_p": args.top_p, "threads": os.cpu_count() or 1}
    proc = subprocess.run([str(BENCH_PYTHON), "-c", _LLAMA_SCRIPT], input=json.dumps(cfg), capture_output=True,
                          text=True, timeout=3600)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        return {"available": False, "reason": f"llama-cpp-python failed in {BENCH_PYTHON}: {last}"}
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"available": True, "backend": f"llama-cpp-python {out['version']} (GGUF Q4_1)", "batch_size": 1,
            "threads": cfg["threads"], "new_tokens": out["new_tokens"], "seconds": round(out["seconds"], 2),
            "tokens_per_s": round(out["new_tokens"] / out["seconds"], 1),
            "samples_per_min": round(len(prompts) / out["seconds"] * 60, 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 16, 32],
                        help="embedded batch sizes to measure; the recipe default is always among them")
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--repeats", type=int, default=3, help="alternating runs per side; the median is reported")
    parser.add_argument("--skip-llama-cpp", action="store_true", help="measure only our embedded path")
    args = parser.parse_args(argv)

    default_batch = GenerationConfig().batch_size
    batch_sizes = sorted(set(args.batch_sizes) | {default_batch})
    prompts = load_prompts(args.prompts)
    load_start = os.getloadavg()[0]
    model, tokenizer = load_embedded()
    ours_runs: dict[int, list[dict]] = {b: [] for b in batch_sizes}
    theirs_runs, theirs = [], {"available": False, "reason": "skipped (--skip-llama-cpp)"}
    # Alternate the two sides so that both see the same background load.
    for repeat in range(1, args.repeats + 1):
        for batch_size in batch_sizes:
            print(f"[{repeat}/{args.repeats}] embedded model, bf16, batch {batch_size}: {len(prompts)} prompts x {args.max_new_tokens} new tokens ...")
            ours_runs[batch_size].append(run_embedded(model, tokenizer, prompts, args, batch_size))
            print(f"  {ours_runs[batch_size][-1]['tokens_per_s']} tokens/s, {ours_runs[batch_size][-1]['samples_per_min']} samples/min")
        if args.skip_llama_cpp:
            continue
        print(f"[{repeat}/{args.repeats}] llama.cpp (llama-cpp-python), same GGUF, batch 1 ...")
        theirs = run_llama_cpp(prompts, args)
        if not theirs["available"]:
            print(f"  llama.cpp unavailable: {theirs['reason']}")
            args.skip_llama_cpp = True
            continue
        theirs_runs.append(theirs)
        print(f"  {theirs['tokens_per_s']} tokens/s, {theirs['samples_per_min']} samples/min")
    by_batch = {b: summarise(runs) for b, runs in ours_runs.items()}
    ours = by_batch[default_batch]
    if theirs_runs:
        theirs = summarise(theirs_runs)
    ratio = round(ours["tokens_per_s"] / theirs["tokens_per_s"], 2) if theirs.get("available") else None
    ratio_by_batch = ({str(b): round(r["tokens_per_s"] / theirs["tokens_per_s"], 2) for b, r in by_batch.items()}
                      if theirs.get("available") else None)
    result = {
        "benchmark": "generation_throughput", "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "load_average_start": round(load_start, 2), "load_average_end": round(os.getloadavg()[0], 2)},
        "settings": {"prompts": len(prompts), "max_new_tokens": args.max_new_tokens, "temperature": args.temperature,
                     "repeats": args.repeats,
                     "top_p": args.top_p, "prompt_source": "HarmBench standard behaviours"},
        "embedded": ours, "embedded_by_batch_size": {str(b): r for b, r in by_batch.items()}, "llama_cpp": theirs,
        "ratio_tokens_per_s": ratio, "ratio_by_batch_size": ratio_by_batch, "target_ratio": TARGET_RATIO,
        "ratio_at": f"generation.batch_size default ({default_batch})",
        "meets_target": None if ratio is None else ratio >= TARGET_RATIO,
    }
    write_json(RESULTS, result)
    print(f"median tokens/s: embedded {ours['tokens_per_s']} at batch {default_batch}, llama.cpp {theirs.get('tokens_per_s')}; "
          f"ratio {ratio} (target >= {TARGET_RATIO}); written to {RESULTS.relative_to(PROJECT_ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
