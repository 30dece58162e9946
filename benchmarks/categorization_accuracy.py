"""How far the nearest-neighbour categoriser can be trusted, and what ``categorization.min_confidence`` buys.

    .venv/bin/python -m benchmarks.categorization_accuracy [--k 7] [--folds 5]

Unlabelled prompts (AdvBench, bring-your-own data) get their category from ``analysis.categorize.knn_vote``
over the labelled prompts. A wrong vote matters most when it puts a held-out prompt into a narrow category:
that prompt could then train a narrow set. This measures it on prompts whose labels are known, HarmBench and
StrongREJECT (read from ../shared/data, mapped into datasets/taxonomy.yaml), embedded with the default
embedding model:

- ``pooled``: both sets together, k-fold; each prompt is voted on by the other folds. This is the situation of
  the demo and paper recipes, where both sets vote.
- ``harmbench_votes_on_strongreject`` and the reverse: one set labels the other, a harder case (different
  wording, and categories the voters lack can never be predicted).

For each confidence threshold: the share of prompts accepted without audit, the accuracy among them, and the
**narrow leak rate** (of accepted prompts voted into a narrow category, the share whose true category is held
out). Prompts below the threshold go to audit.

``label_cross_check``: how many StrongREJECT prompts whose own label maps to a narrow category HarmBench's
labelled prompts vote into a held-out category at ``narrow_min_confidence`` (``analysis.select.
contradicted_labels``, which keeps them out of the narrow sets), with the prompts themselves.
Results: benchmarks/results/categorization_accuracy.json.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np
import pandas as pd

from ethos.paths import PROJECT_ROOT
from ethos.recipe import CategorizationConfig
from ethos.store import write_json
from ethos.taxonomy import load_taxonomy

SHARED = PROJECT_ROOT.parent / "shared" / "data"
RESULTS = PROJECT_ROOT / "benchmarks" / "results" / "categorization_accuracy.json"
THRESHOLDS = (0.0, 0.5, 0.6, 0.7, 0.8, 0.9)


def labelled_prompts() -> pd.DataFrame:
    """HarmBench and StrongREJECT prompts with their labels mapped into the taxonomy (dropped labels removed)."""
    taxonomy = load_taxonomy()
    harmbench = pd.read_csv(SHARED / "harmbench" / "harmbench_behaviors_text_all.csv")
    strongreject = pd.read_csv(SHARED / "strongreject" / "strongreject_dataset.csv")
    frames = [
        pd.DataFrame({"source": "harmbench", "prompt": harmbench["Behavior"],
                      "category": [taxonomy.map_label("harmbench", c) for c in harmbench["SemanticCategory"]]}),
        pd.DataFrame({"source": "strongreject", "prompt": strongreject["forbidden_prompt"],
                      "category": [taxonomy.map_label("strongreject", c) for c in strongreject["category"]]}),
    ]
    frame = pd.concat(frames, ignore_index=True).dropna(subset=["category"])
    return frame.drop_duplicates("prompt").reset_index(drop=True)


def score(truth: np.ndarray, predicted: np.ndarray, confidence: np.ndarray, narrow: set[str]) -> list[dict]:
    """Coverage, accuracy and narrow leak rate of the votes accepted at each threshold."""
    rows = []
    predicted_narrow = np.isin(predicted, list(narrow))
    truly_narrow = np.isin(truth, list(narrow))
    for threshold in THRESHOLDS:
        accepted = confidence >= threshold
        into_narrow = accepted & predicted_narrow
        rows.append({
            "min_confidence": threshold,
            "accepted_share": round(float(accepted.mean()), 3),
            "accuracy_of_accepted": round(float((truth[accepted] == predicted[accepted]).mean()), 3) if accepted.any() else None,
            "accepted_into_narrow": int(into_narrow.sum()),
            "narrow_leak_rate": round(float((~truly_narrow[into_narrow]).mean()), 3) if into_narrow.any() else None,
            "narrow_recall": round(float((into_narrow & truly_narrow).sum() / truly_narrow.sum()), 3),
        })
    return rows


def pooled(embeddings: np.ndarray, labels: np.ndarray, k: int, folds: int, seed: int):
    from ethos.analysis.categorize import knn_vote

    fold = np.random.default_rng(seed).permutation(len(labels)) % folds
    predicted = np.empty(len(labels), dtype=object)
    confidence = np.zeros(len(labels))
    for f in range(folds):
        test, train = fold == f, fold != f
        votes, shares = knn_vote(embeddings[test], embeddings[train], labels[train], k)
        predicted[test], confidence[test] = votes, shares
    return predicted.astype(str), confidence


def label_cross_check(data: pd.DataFrame, embeddings: np.ndarray, k: int, min_share: float) -> dict:
    from ethos.analysis.select import contradicted_labels

    taxonomy = load_taxonomy()
    frame = data.assign(prompt_id=[f"{s}-{i}" for i, s in enumerate(data["source"])], category_method="source_label",
                        role=np.where(data["source"] == "harmbench", "eval", "train"))
    vectors = pd.DataFrame({"prompt_id": frame["prompt_id"], "embedding": list(embeddings)})
    candidates = frame[(frame["source"] == "strongreject") & frame["category"].isin(taxonomy.narrow)]
    flagged = contradicted_labels(candidates, frame, vectors, k, list(taxonomy.held_out), min_share)
    return {"strongreject_narrow_labels": len(candidates), "voted_held_out": len(flagged), "min_share": min_share,
            "prompts": frame.set_index("prompt_id").loc[flagged["prompt_id"], "prompt"].tolist()}


def main(argv: list[str] | None = None) -> int:
    from ethos.analysis.categorize import knn_vote
    from ethos.analysis.embeddings import embed_texts

    defaults = CategorizationConfig()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--k", type=int, default=defaults.k)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--embedding-model", default=defaults.embedding_model)
    args = parser.parse_args(argv)

    narrow = set(load_taxonomy().narrow)
    data = labelled_prompts()
    started = time.perf_counter()
    embeddings = embed_texts(data["prompt"].tolist(), args.embedding_model)
    embed_s = time.perf_counter() - started
    labels = data["category"].to_numpy().astype(str)
    results = {}
    predicted, confidence = pooled(embeddings, labels, args.k, args.folds, seed=0)
    results["pooled"] = {"prompts": len(labels), "folds": args.folds, "thresholds": score(labels, predicted, confidence, narrow)}
    for voters, queries in (("harmbench", "strongreject"), ("strongreject", "harmbench")):
        v, q = (data["source"] == voters).to_numpy(), (data["source"] == queries).to_numpy()
        votes, shares = knn_vote(embeddings[q], embeddings[v], labels[v], args.k)
        unreachable = sorted(set(labels[q]) - set(labels[v]))
        results[f"{voters}_votes_on_{queries}"] = {
            "prompts": int(q.sum()), "categories_the_voters_lack": unreachable,
            "thresholds": score(labels[q], np.array(votes), shares, narrow)}
    results["label_cross_check"] = label_cross_check(data, embeddings, args.k, defaults.narrow_min_confidence)
    at_default = next(r for r in results["pooled"]["thresholds"] if r["min_confidence"] == defaults.min_confidence)
    result = {
        "benchmark": "categorization_accuracy", "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "load_average": round(os.getloadavg()[0], 2)},
        "settings": {"k": args.k, "embedding_model": args.embedding_model, "narrow": sorted(narrow),
                     "data": "HarmBench text behaviours + StrongREJECT, labels mapped by datasets/taxonomy.yaml"},
        "embedding_seconds": round(embed_s, 1),
        "category_counts": data["category"].value_counts().to_dict(),
        **results,
        "at_default_min_confidence": at_default,
    }
    write_json(RESULTS, result)
    for name in ("pooled", "harmbench_votes_on_strongreject", "strongreject_votes_on_harmbench"):
        print(f"{name} ({results[name]['prompts']} prompts):")
        for r in results[name]["thresholds"]:
            print(f"  min_confidence {r['min_confidence']:.1f}: accepted {r['accepted_share']:.0%}, "
                  f"accuracy {r['accuracy_of_accepted']}, into narrow {r['accepted_into_narrow']}, "
                  f"narrow leak rate {r['narrow_leak_rate']}, narrow recall {r['narrow_recall']}")
    check = results["label_cross_check"]
    print(f"label cross-check: {check['voted_held_out']} of {check['strongreject_narrow_labels']} StrongREJECT narrow labels "
          f"voted held out by HarmBench at {check['min_share']}")
    print(f"written to {RESULTS.relative_to(PROJECT_ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
