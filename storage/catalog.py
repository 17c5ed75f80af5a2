"""The metric catalog: Parquet tables in the store, queried with DuckDB.

``catalog/checkpoints/sweep=<sweep>/<shard>.parquet`` and ``catalog/runs/sweep=<sweep>/<shard>.parquet``
hold one file per shard. The runs file is written last and is the shard's commit: a shard whose runs
file exists is complete, and the ``checkpoints`` view only shows rows of committed runs, so a crash
between the two writes is invisible to queries.
"""

from __future__ import annotations

import io

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from storage.store import Store, StoreError, redact

# the evaluations area (storage/evals.py reads and writes it; the catalog only globs it)
EVALS, RESULTS, BASELINES = "evals", "results.parquet", "baselines.parquet"

TABLES = ("checkpoints", "runs", "evaluations", "baselines")


class CatalogError(StoreError):
    """SQL that does not parse or names something that is not there."""


def shard_file(shard: int) -> str:
    return f"shard-{shard:06d}.parquet"


def write_table(store: Store, table: pa.Table, *parts: str) -> None:
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    store.write_bytes(buf.getvalue(), *parts)


def write_shard(store: Store, kind: str, sweep: str, shard: int, table: pa.Table) -> None:
    """Write one shard's rows of ``kind`` ('checkpoints' or 'runs'). Re-writing a shard replaces its
    file whole, so a retried shard never duplicates rows."""
    write_table(store, table, "catalog", kind, f"sweep={sweep}", shard_file(shard))


def remove_shard(store: Store, sweep: str, shard: int) -> None:
    """Take a shard's commit back: its ``runs`` file (the commit) first, then its ``checkpoints`` file,
    so that at no moment does a committed shard lack its checkpoints."""
    for kind in ("runs", "checkpoints"):
        path = store.path("catalog", kind, f"sweep={sweep}", shard_file(shard))
        if store.fs.exists(path):
            store.fs.rm_file(path)
    store.refresh()


def committed_shards(store: Store, sweep: str) -> set[int]:
    names = store.ls("catalog", "runs", f"sweep={sweep}")
    return {int(n[len("shard-") : -len(".parquet")]) for n in names if n.startswith("shard-") and n.endswith(".parquet")}


def read_sweep_runs(store: Store, sweep: str) -> pa.Table | None:
    """All committed run rows of one sweep (None if nothing is committed yet)."""
    folder = ("catalog", "runs", f"sweep={sweep}")
    tables = []
    for name in store.ls(*folder):
        if name.endswith(".parquet"):
            with store.fs.open(store.path(*folder, name), "rb") as f:
                tables.append(pq.read_table(f))
    return pa.concat_tables(tables, promote_options="default") if tables else None


def connect(store: Store) -> duckdb.DuckDBPyConnection:
    """A DuckDB connection with views ``checkpoints``, ``runs``, ``evaluations`` and ``baselines`` over
    the store (a view exists once its table has at least one file), locked to the store."""
    con = duckdb.connect()
    if not store.is_local:
        store.refresh()  # glob (ours and DuckDB's) reads s3fs's cached listings: see new shards
        con.register_filesystem(store.fs)

    def source(pattern: str, hive: bool) -> str | None:
        if not store.fs.glob(store.path(pattern)):
            return None
        opts = "hive_partitioning=true, hive_types_autocast=false, union_by_name=true" if hive else "union_by_name=true"
        url = store.full_url(pattern).replace("'", "''")  # a quote in the store's path stays inside the literal
        return f"read_parquet('{url}', {opts})"

    runs = source("catalog/runs/*/*.parquet", hive=True)
    if runs:
        con.execute(f"create view runs as select sweep, * exclude (sweep) from {runs}")
    ckpts = source("catalog/checkpoints/*/*.parquet", hive=True)
    if ckpts and runs:
        con.execute(
            "create view checkpoints as select c.sweep, c.* exclude (sweep) "
            f"from {ckpts} c semi join runs r on c.sweep = r.sweep and c.run = r.run"
        )
    evals = source(f"{EVALS}/*/{RESULTS}", hive=False)
    if evals:
        con.execute(f"create view evaluations as select * from {evals}")
        base = source(f"{EVALS}/*/{BASELINES}", hive=False)
        if base:  # only evaluations that committed (wrote results.parquet) count
            con.execute(f"create view baselines as select b.* from {base} b semi join (select distinct eval from evaluations) e using (eval)")
    lock_down(con, store)
    return con


def lock_down(con: duckdb.DuckDBPyConnection, store: Store) -> None:
    """From here on the connection answers questions about the store and nothing else: no file outside
    the store's root (no ``read_csv('/etc/passwd')``, no ``COPY ... TO`` elsewhere), no extension
    installed or loaded, and no setting changed back."""
    con.execute("set allowed_directories = ?", [[store.full_url().rstrip("/") + "/"]])
    for setting in ("enable_external_access", "autoinstall_known_extensions", "autoload_known_extensions"):
        con.execute(f"set {setting} = false")
    con.execute("set lock_configuration = true")


def column(name: str) -> str:
    """A column name to paste into SQL (a metric: ``best_{name}``); refused unless a plain identifier,
    since values go in as parameters and only names are pasted."""
    if not name.replace("_", "").isalnum():
        raise CatalogError(f"not a column name: {name!r}")
    return name


READ_STATEMENTS = {duckdb.StatementType.SELECT, duckdb.StatementType.EXPLAIN}


def query(store: Store, sql: str, params: list | None = None) -> pa.Table:
    """Run SQL over the catalog, values bound to its ``?`` placeholders from ``params`` (never pasted into
    the text); one-line CatalogError if it does not parse or names a missing table."""
    con = connect(store)
    try:
        # questions only: a COPY ... TO inside the store could overwrite a committed shard
        kinds = {s.type for s in duckdb.extract_statements(sql)}
        if not kinds <= READ_STATEMENTS:
            raise CatalogError("only questions are answered (SELECT, WITH, DESCRIBE, SHOW, SUMMARIZE, EXPLAIN), "
                               f"not {', '.join(sorted(k.name for k in kinds - READ_STATEMENTS))}")
        relation = con.sql(sql, params=params)
        return relation.to_arrow_table() if relation is not None else pa.table({})
    except duckdb.Error as e:
        first = redact(str(e)).strip().splitlines()[0]
        missing = [t for t in TABLES if t not in {r[0] for r in con.execute("select view_name from duckdb_views()").fetchall()}]
        hint = f" (empty so far: {', '.join(missing)})" if missing and "does not exist" in first else ""
        raise CatalogError(f"SQL error: {first}{hint}") from None
    finally:
        con.close()
