"""The run store: a run is a folder of parquet tables registered in ``catalog.duckdb`` with provenance.

Layout of a run folder::

    run.json            which recipe made it (path, hash), created when
    recipe.yaml         the recipe as given, copied at creation
    catalog.duckdb      ethos_tables, ethos_stages, ethos_artifacts, plus one view per table
    tables/NAME.parquet every stage's output tables
    adapters/, report/  artifacts (folders) registered in ethos_artifacts

Tables are written to a temporary file and renamed, so a crash never leaves half a table behind.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import pandas as pd

from . import __version__
from .errors import EthosError

_SCHEMA = """
CREATE TABLE IF NOT EXISTS ethos_tables (
  name VARCHAR PRIMARY KEY, stage VARCHAR, path VARCHAR, rows BIGINT, fingerprint VARCHAR, created_at TIMESTAMP);
CREATE TABLE IF NOT EXISTS ethos_stages (
  name VARCHAR PRIMARY KEY, status VARCHAR, fingerprint VARCHAR, recipe_hash VARCHAR, code_version VARCHAR,
  git_commit VARCHAR, model VARCHAR, inputs JSON, outputs JSON, started_at TIMESTAMP, finished_at TIMESTAMP,
  message VARCHAR);
CREATE TABLE IF NOT EXISTS ethos_artifacts (
  name VARCHAR PRIMARY KEY, kind VARCHAR, stage VARCHAR, path VARCHAR, fingerprint VARCHAR, meta JSON,
  created_at TIMESTAMP);
"""


def now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def git_commit() -> str | None:
    from .paths import PROJECT_ROOT

    try:
        out = subprocess.run(
            ["git", "-C", str(PROJECT_ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


def code_version() -> str:
    return f"ethos-factory {__version__}"


class RunStore:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.tables_dir = self.root / "tables"
        self.catalog_path = self.root / "catalog.duckdb"

    # -- creation and the recipe -------------------------------------------------------------------------
    @classmethod
    def create(cls, root: str | Path, recipe_path: str | Path) -> "RunStore":
        """Create (or reopen) a run folder for a recipe; refuses a folder made by a different recipe name."""
        from .recipe import load_recipe

        recipe_path = Path(recipe_path).resolve()
        recipe = load_recipe(recipe_path)  # validate before anything is written
        store = cls(root)
        meta_path = store.root / "run.json"
        if meta_path.exists():
            meta = json.loads(meta_path.read_text())
            if meta.get("name") != recipe.name:
                raise EthosError(
                    f"{store.root} holds run {meta.get('name')!r}, not {recipe.name!r}: choose another --out folder"
                )
        store.tables_dir.mkdir(parents=True, exist_ok=True)
        with atomic_path(store.root / "recipe.yaml") as tmp:
            shutil.copyfile(recipe_path, tmp)
        meta = {"name": recipe.name, "recipe_path": str(recipe_path), "recipe_hash": recipe.section_hash(),
                "created_at": now().isoformat(timespec="seconds")}
        _atomic_write_text(meta_path, json.dumps(meta, indent=2))
        with store.connect():
            pass
        return store

    @classmethod
    def open(cls, root: str | Path) -> "RunStore":
        store = cls(root)
        if not (store.root / "run.json").exists():
            raise EthosError(f"{root} is not a run folder (no run.json): create one with `ethos run RECIPE --out {root}`")
        return store

    def meta(self) -> dict:
        return json.loads((self.root / "run.json").read_text())

    def recipe(self):
        """The run's recipe (its copy in the run folder), with paths resolved against the original's folder."""
        from .recipe import parse_recipe
        import yaml

        raw = yaml.safe_load((self.root / "recipe.yaml").read_text())
        return parse_recipe(raw, str(self.root / "recipe.yaml"), Path(self.meta()["recipe_path"]).parent)

    # -- the catalog ---------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def connect(self, read_only: bool = False):
        """A DuckDB connection to the catalog with a view per registered table. Keep it short-lived."""
        import duckdb

        self.root.mkdir(parents=True, exist_ok=True)
        con = duckdb.connect(str(self.catalog_path), read_only=read_only and self.catalog_path.exists())
        try:
            if not read_only:
                con.execute(_SCHEMA)
            for name, path in con.execute("SELECT name, path FROM ethos_tables").fetchall():
                full = self.root / path
                if full.exists():
                    # DuckDB does not take parameters in view definitions, hence the quoted literal.
                    con.execute(f"CREATE OR REPLACE TEMP VIEW \"{name}\" AS SELECT * FROM read_parquet('{_sql_str(full)}')")
            yield con
        finally:
            con.close()

    # -- tables --------------------------------------------------------------------------------------------
    def table_path(self, name: str) -> Path:
        return self.tables_dir / f"{name}.parquet"

    def has_table(self, name: str) -> bool:
        return self.table_path(name).exists() and self.table_info(name) is not None

    def table_info(self, name: str) -> dict | None:
        if not self.catalog_path.exists():
            return None
        with self.connect() as con:
            row = con.execute(
                "SELECT name, stage, path, rows, fingerprint, created_at FROM ethos_tables WHERE name = ?", [name]
            ).fetchone()
        if row is None:
            return None
        return dict(zip(["name", "stage", "path", "rows", "fingerprint", "created_at"], row))

    def write_table(self, name: str, frame: pd.DataFrame, stage: str) -> Path:
        """Write a table atomically and register it. Returns its path."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = self.table_path(name)
        table = pa.Table.from_pandas(frame.reset_index(drop=True), preserve_index=False)
        with atomic_path(path) as tmp:
            pq.write_table(table, tmp)
        fingerprint = file_sha256(path)
        with self.connect() as con:
            con.execute(
                "INSERT OR REPLACE INTO ethos_tables VALUES (?, ?, ?, ?, ?, ?)",
                [name, stage, str(path.relative_to(self.root)), len(frame), fingerprint, now()],
            )
        return path

    def read_table(self, name: str, columns: list[str] | None = None) -> pd.DataFrame:
        """A table as a DataFrame; ``columns`` reads only those (large tables read much faster)."""
        path = self.table_path(name)
        if not path.exists():
            raise EthosError(f"table {name!r} missing in {self.root}: run the stage that makes it (`ethos status {self.root}`)")
        return pd.read_parquet(path, columns=columns)

    def table_fingerprint(self, name: str) -> str | None:
        info = self.table_info(name)
        return info["fingerprint"] if info else None

    def query(self, sql: str, params: list | None = None) -> pd.DataFrame:
        with self.connect() as con:
            return con.execute(sql, params or []).df()

    # -- artifacts (folders such as adapters and reports) --------------------------------------------------
    def artifact_dir(self, kind: str, name: str) -> Path:
        path = self.root / kind / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def register_artifact(self, name: str, kind: str, stage: str, path: Path, fingerprint: str, meta: dict) -> None:
        with self.connect() as con:
            con.execute(
                "INSERT OR REPLACE INTO ethos_artifacts VALUES (?, ?, ?, ?, ?, ?, ?)",
                [name, kind, stage, str(Path(path).resolve().relative_to(self.root.resolve())), fingerprint,
                 json.dumps(meta, default=str), now()],
            )

    def artifacts(self, kind: str | None = None) -> pd.DataFrame:
        sql = "SELECT * FROM ethos_artifacts" + (" WHERE kind = ?" if kind else "") + " ORDER BY name"
        return self.query(sql, [kind] if kind else [])

    # -- stages --------------------------------------------------------------------------------------------
    def stage_record(self, name: str) -> dict | None:
        if not self.catalog_path.exists():
            return None
        frame = self.query("SELECT * FROM ethos_stages WHERE name = ?", [name])
        return None if frame.empty else frame.iloc[0].to_dict()

    def record_stage(self, name: str, status: str, fingerprint: str, recipe_hash: str, model: str,
                     inputs: dict, outputs: dict, started_at, message: str = "") -> None:
        with self.connect() as con:
            con.execute(
                "INSERT OR REPLACE INTO ethos_stages VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [name, status, fingerprint, recipe_hash, code_version(), git_commit(), model, json.dumps(inputs),
                 json.dumps(outputs), started_at, now(), message[:2000]],
            )


def _sql_str(path: Path) -> str:
    return str(path).replace("'", "''")


@contextlib.contextmanager
def atomic_path(path: str | Path):
    """Yield a temporary path beside ``path`` to write to; it replaces ``path`` only when the block succeeds.

    A kill or an error mid-write leaves the old file (or none) and no partial one: readers never see a torn file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _atomic_write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: Path, data) -> None:
    """Write JSON atomically (stages' reports and summaries)."""
    _atomic_write_text(path, json.dumps(data, indent=2, default=str, sort_keys=False))
