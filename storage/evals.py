"""Evaluations in the store: everything under ``evals/``, in one place.

``evals/<eval>/``:
    params.zarr        float32 [row, param]: row i holds the parameters that achieved row i of results
    baselines.parquet  the same start networks under the sweep's recipe and SGD/Adam curves
    summary.json       headline numbers (also the source of ``evals/index.md``)
    report.md, *.png   the human report (markdown, plots beside it)
    report.html        the same report in one self-contained file (plots inside: opens offline, from any store)
    results.parquet    one row per (network, prompt, step, sample); written last = the commit
``evals/index.md``, ``evals/index.html``, ``evals/trend.png``
                       every committed evaluation, newest first, under a plot of how they changed
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from storage import catalog, params
from storage.catalog import BASELINES, EVALS, RESULTS
from storage.store import Store, StoreError, check_name

PARAMS, SUMMARY, REPORT, REPORT_HTML = "params.zarr", "summary.json", "report.md", "report.html"
INDEX, TREND = "index.md", "trend.png"


def exists(store: Store, name: str) -> bool:
    """Has evaluation ``name`` committed (written its results)?"""
    check_name(name, "eval")
    return store.exists(EVALS, name, RESULTS)


def names(store: Store) -> list[str]:
    """Every committed evaluation."""
    return [e for e in store.ls(EVALS) if exists(store, e)]


def check_new(store: Store, name: str) -> None:
    if exists(store, name):
        raise StoreError(f"evaluation {name!r} already exists in {store.url}; choose another --eval name")


def check_committed(store: Store, name: str) -> None:
    if not exists(store, name):
        raise StoreError(f"no evaluation {name!r} in store {store.url} (evaluations: {', '.join(names(store)) or 'none'})")


def write(store: Store, name: str, vectors: np.ndarray, results: pa.Table, baselines: pa.Table, summary: dict,
          files: dict[str, bytes]) -> None:
    """Parameters, baselines, summary and report ``files`` first; ``results.parquet`` last, as the commit:
    an evaluation that crashed half-way is not in the ``evaluations`` table and its name can be reused."""
    check_name(name, "eval")
    params.write_rows(store, (EVALS, name, PARAMS), vectors)
    catalog.write_table(store, baselines, EVALS, name, BASELINES)
    store.write_json(summary, EVALS, name, SUMMARY)
    for file, data in files.items():
        store.write_bytes(data, EVALS, name, file)
    catalog.write_table(store, results, EVALS, name, RESULTS)


def read_summary(store: Store, name: str) -> dict:
    return store.read_json(EVALS, name, SUMMARY)


def summaries(store: Store) -> list[dict]:
    """The summaries of every committed evaluation, newest first."""
    out = [read_summary(store, e) for e in names(store) if store.exists(EVALS, e, SUMMARY)]
    return sorted(out, key=lambda s: s.get("created_at", ""), reverse=True)


def read_file(store: Store, name: str, file: str) -> bytes:
    """One file of evaluation ``name``'s report (``report.md``, a plot)."""
    return store.fs.cat_file(store.path(EVALS, name, file))


def report_files(store: Store, name: str) -> dict[str, bytes]:
    """``report.md`` and the plots it shows, name -> bytes."""
    return {f: read_file(store, name, f) for f in [REPORT, *store.ls(EVALS, name)] if f == REPORT or f.endswith(".png")}


def report_url(store: Store, name: str) -> str:
    """Where the self-contained HTML report is (``report.md`` for evaluations written before it)."""
    return store.full_url(EVALS, name, REPORT_HTML if store.exists(EVALS, name, REPORT_HTML) else REPORT)


def write_index(store: Store, files: dict[str, bytes]) -> None:
    """``evals/index.md``, ``index.html`` and the plot they show."""
    for file, data in files.items():
        store.write_bytes(data, EVALS, file)


def read_index(store: Store) -> dict[str, bytes]:
    """``index.md`` and the plot it shows."""
    return {f: store.fs.cat_file(store.path(EVALS, f)) for f in (INDEX, TREND)}


def read_results(store: Store, name: str) -> pa.Table:
    check_committed(store, name)
    with store.fs.open(store.path(EVALS, name, RESULTS), "rb") as f:
        return pq.read_table(f)


def open_params(store: Store, name: str):
    """The generated parameters ``[row, param]`` of a committed evaluation (a Zarr array)."""
    return params.open_params(store, EVALS, name, PARAMS)
