"""Interoperation with the G.pt authors' released checkpoint datasets and with plain PyTorch.

Import: pour an official G.pt checkpoint dataset (MNIST MLPs, CIFAR-10 CNNs, Cartpole policies) into a
store as an ordinary sweep, streaming and resumable with the same shard commit protocol as ``collect``.
Export: write any stored checkpoint or generated parameter vector as a safetensors file (or a torch
``state_dict`` ``.pt``) that ``problems.get(name).module().load_state_dict`` accepts.

The official layout
-------------------
As written by the data-generation scripts of github.com/wpeebles/G.pt (``data_gen/train_mnist.py``,
``data_gen/train_cifar10.py``, ``data_gen/train_rl.py``) and read by its ``Gpt/data/dataset_lmdb.py`` and
``Gpt/data/database.py``:

* A dataset folder (``checkpoint_datasets/mnist`` after unzipping ``mnist.zip``) holds one folder per
  training job. Each job folder is an LMDB environment (``data.mdb``, ``lock.mdb``; opened with
  ``subdir=True``) plus ``runs.json`` and, once the job finished, an empty ``DONE.txt``. The job folder is
  named after the run, the run's seed printed as six digits (``000123``).
* A folder may hold several runs merged together: its name is the runs' names joined by ``_``
  (``000123_000124``) and its ``runs.json`` is then ``{run name: that run's runs.json}``. The official
  loader splits folder names on ``_`` to find the runs; so does this importer.
* LMDB keys (UTF-8). Classification problems: ``"{run}/ep{EEE}_it{IIIII}.pt"`` with the epoch (0-based,
  three digits) and the iteration *within* that epoch (1-based after the update, five digits); the
  initial network is ``ep000_it00000``, the last one ``ep{E-1}_it{iters per epoch}``. Cartpole:
  ``"{run}/it{IIIII}.pt"`` with the PPO iteration. Zero padding makes key order chronological.
* The value of a checkpoint key is the flattened ``state_dict`` (every tensor's ``flatten()``
  concatenated in ``state_dict`` order) as raw native-endian (little-endian) float32 bytes, no header.
* ``"{key}_arch"`` holds the number of elements of each ``state_dict`` tensor, in the same order. It
  is written from an int64 tensor but the database class casts every value to float32 before storing,
  so it is float32 bytes too (``[7840, 10, 100, 10]`` for the MNIST MLP). Cartpole also stores
  ``"{key}_train_ret"`` (one float32), which duplicates ``runs.json``.
* ``runs.json`` (``json.dump(..., sort_keys=True)``, written once at the end of the job, just before
  ``DONE.txt``)::

      {"checkpoints": {key: {metric: value, ...}, ...},   # one entry per checkpoint key
       "metadata": {"avg_test_loss": [...], "avg_test_err": [...],        # per checkpoint, in order
                    "optimal_test_loss": x, "optimal_test_err": x,
                    "min_parameter_val": x, "max_parameter_val": x}}

  Classification metrics per checkpoint: ``avg_train_loss`` and ``avg_train_err`` (of the *current
  mini-batch*, not the whole training set), ``avg_test_loss`` and ``avg_test_err`` (the full test set).
  Errors are **percentages** (0-100). Cartpole: ``train_ret`` (mean episode return), with metadata
  ``train_ret`` and ``optimal_train_ret``.

Mapping into a store
--------------------
Runs are numbered 0..N-1 in the official loader's order (folders sorted by name, runs of a merged
folder in the order of its name) and grouped into shards of ``shard_size``; the list is frozen in
``sweeps/<sweep>/import.json`` and its digest in ``config.json``. Metrics: ``train_loss`` =
``avg_train_loss``, ``train_error`` = ``avg_train_err`` / 100, ``test_loss`` = ``avg_test_loss``,
``test_error`` = ``avg_test_err`` / 100, ``return`` = ``train_ret``. ``step`` = epoch x iterations per
epoch + iteration (cartpole: the PPO iteration), ``epoch`` = step / iterations per epoch.

Every run gets a ``runs`` row, whatever was wrong with it, with ``status``:

``ok``             finished (``DONE.txt``) with exactly ``n_ckpts`` checkpoints, all finite
``unfinished``     no ``DONE.txt``: whatever checkpoints are there are imported (metrics NaN without
                   ``runs.json``)
``diverged``       a non-finite or huge (> 1e4) parameter or a non-finite metric: ``n_ckpts`` counts the
                   checkpoints before it
``arch_mismatch``  ``_arch`` sizes (or the vector length) differ from the problem's layers: nothing
                   imported (``n_ckpts`` 0)
``corrupt``        an LMDB error, a key listed in ``runs.json`` that is missing, or a ``runs.json`` that is not
                   JSON: checkpoints before it kept (all of them, metrics unknown, for a damaged ``runs.json``)
``short``          finished and clean but fewer checkpoints than the sweep's ``n_ckpts``
``truncated``      more checkpoints than the sweep's ``n_ckpts``: the first ``n_ckpts`` imported

The extra ``runs`` columns ``source_run``, ``source_dir``, ``source_ckpts`` and ``note`` (what was wrong)
and the ``checkpoints`` column ``source_key`` keep the way back to the original data.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import re
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from gptpipe import problems
from gptpipe.stages import collect
from gptpipe.sweep.config import SweepConfig, SweepConfigError
from gptpipe.sweep.recorder import DIVERGED_ABS
from storage import catalog, evals, sweeps
from storage.store import Store, StoreError, check_name, is_object_store, open_store

PLAN_FILE = "import.json"
EPOCH_KEY = re.compile(r"^(?P<run>[^/]+)/ep(?P<epoch>\d+)_it(?P<it>\d+)\.pt$")
ITER_KEY = re.compile(r"^(?P<run>[^/]+)/it(?P<it>\d+)\.pt$")


class InteropError(StoreError):
    """Bad input to an import or export: one line for the user."""


@dataclass(frozen=True)
class Layout:
    """How one problem's official dataset is laid out."""

    dataset: str  # the official name (``checkpoint_datasets/<dataset>``, ``<dataset>.zip``)
    key: re.Pattern
    metrics: dict  # our metric -> (their runs.json name, scale to ours)
    epoch_iters: int | None  # optimiser steps per epoch for ep/it keys; None: the key's "it" is the step
    recipe: dict  # the released generation script's settings, as SweepConfig fields
    n_ckpts: int = 200  # checkpoints per run in the released datasets


_CLASSIFIER_METRICS = {
    "train_loss": ("avg_train_loss", 1.0),
    "train_error": ("avg_train_err", 0.01),  # percent -> fraction
    "test_loss": ("avg_test_loss", 1.0),
    "test_error": ("avg_test_err", 0.01),
}
_SGD = dict(momentum=0.9, nesterov=True, weight_decay=5e-4, batch_size=128, schedule="cosine", lr_min=0.1, lr_max=0.1)

LAYOUTS = {
    # MNIST: 60,000 training images, batches of 128, drop_last -> 468 iterations per epoch; 25 epochs, lr 0.1
    "mnist_mlp": Layout("mnist", EPOCH_KEY, _CLASSIFIER_METRICS, 468, dict(data="mnist", epochs=25, **_SGD)),
    # CIFAR-10: 50,000 / 128 -> 390 iterations per epoch; 50 epochs, lr 0.1
    "cifar_cnn": Layout("cifar10", EPOCH_KEY, _CLASSIFIER_METRICS, 390, dict(data="cifar10", epochs=50, **_SGD)),
    # Cartpole (IsaacGym PPO, 500 iterations): the key's number is the PPO iteration
    "cartpole": Layout("cartpole", ITER_KEY, {"return": ("train_ret", 1.0)}, None, dict(data="gym")),
}


def layout_for(problem_name: str) -> tuple[object, Layout]:
    problem = problems.get(problem_name)  # one line (ProblemError) for an unknown problem
    if problem_name not in LAYOUTS:
        raise InteropError(f"there is no official G.pt checkpoint dataset for problem {problem_name!r} "
                           f"(import-gpt takes {', '.join(p for p in LAYOUTS if p in problems.PROBLEMS)})")
    return problem, LAYOUTS[problem_name]


# --- reading the official layout -------------------------------------------------------------------


def scan(path: str) -> list[tuple[str, str]]:
    """``[(run name, folder relative to path)]`` in the official loader's order. ``path`` is a dataset
    folder of run folders, or one run folder itself."""
    root = os.path.abspath(path)
    if not os.path.isdir(root):
        raise InteropError(f"{path} is not a folder")
    if os.path.isfile(os.path.join(root, "data.mdb")):
        folders = [("", os.path.basename(root))]
    else:
        folders = [(d, d) for d in sorted(os.listdir(root)) if os.path.isfile(os.path.join(root, d, "data.mdb"))]
    if not folders:
        raise InteropError(f"no G.pt run folders (LMDB folders with data.mdb) in {path}")
    seen: dict[str, str] = {}
    out = []
    for rel, name in folders:
        for run in name.split("_"):
            if not run:
                continue
            if run in seen:
                raise InteropError(f"run {run!r} is in two folders of {path}: {seen[run] or '.'} and {rel or '.'}")
            seen[run] = rel
            out.append((run, rel))
    return out


def _order(layout: Layout, match: re.Match) -> tuple[int, int]:
    it = int(match.group("it"))
    return (int(match.group("epoch")), it) if "epoch" in match.groupdict() else (0, it)


def _step(layout: Layout, match: re.Match) -> tuple[int, float]:
    epoch, it = _order(layout, match)
    if layout.epoch_iters is None:
        return it, float(it)
    step = epoch * layout.epoch_iters + it
    return step, step / layout.epoch_iters


@functools.lru_cache(maxsize=8)
def _runs_json(folder: str) -> dict | str | None:
    """The folder's runs.json; None without one; the reason (a string) when it cannot be read."""
    path = os.path.join(folder, "runs.json")
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)  # Python's json reads the Infinity/NaN json.dump writes
    except (OSError, ValueError) as e:  # ValueError: bad JSON or bad UTF-8
        return f"runs.json unreadable: {type(e).__name__}"
    return data if isinstance(data, dict) else "runs.json unreadable: not a JSON object"


def _run_json(folder: str, run: str) -> dict | None:
    data = _runs_json(folder)
    if not isinstance(data, dict):
        return None
    if isinstance(data.get(run), dict) and "checkpoints" in data[run]:
        return data[run]  # a merged folder: {run: runs.json}
    if "checkpoints" in data:
        return data
    return None


_FOLDER_LOCKS: dict[str, threading.Lock] = {}
_LOCKS_LOCK = threading.Lock()


def _folder_lock(folder: str) -> threading.Lock:
    """One LMDB environment per folder at a time in this process (LMDB forbids opening one twice): a
    merged folder's runs can fall into two shards that run in concurrent threads."""
    with _LOCKS_LOCK:
        return _FOLDER_LOCKS.setdefault(os.path.abspath(folder), threading.Lock())


def _open_lmdb(folder: str):
    import lmdb

    return lmdb.open(folder, readonly=True, lock=False, readahead=False, subdir=True, max_readers=4)


@dataclass
class RunData:
    """One official run as read from its folder."""

    params: np.ndarray  # float32 [n, P] (only the imported checkpoints)
    metrics: dict[str, np.ndarray]  # ours -> [n]
    keys: list[str]
    steps: list[int]
    epochs: list[float]
    status: str
    source_ckpts: int
    notes: list[str] = field(default_factory=list)


_PRECEDENCE = ("arch_mismatch", "corrupt", "diverged", "truncated", "unfinished", "short", "ok")


def read_run(folder: str, run: str, problem, layout: Layout, n_ckpts: int) -> RunData:
    """Read one run, never raising for what is wrong with the data: that becomes its status and notes."""
    with _folder_lock(folder):
        return _read_run(folder, run, problem, layout, n_ckpts)


class _Stop(Exception):
    """What ends the reading of a run early: its status, a note, and whether what was read is dropped."""

    def __init__(self, status: str, note: str, drop: bool = False):
        super().__init__(note)
        self.status, self.note, self.drop = status, note, drop


def _listed_names(txn, info: dict | None, run: str, done: bool, statuses: set, notes: list) -> list[str]:
    """The run's checkpoint keys: from runs.json, else every LMDB key under ``<run>/``."""
    if info is not None:
        return list(info.get("checkpoints", {}))
    if done:
        statuses.add("corrupt")
        notes.append("no runs.json entry for the run")
    else:
        notes.append("no runs.json: metrics unknown")
    prefix, names = f"{run}/".encode(), []
    cursor = txn.cursor()
    if cursor.set_range(prefix):
        for k in cursor.iternext(values=False):
            if not k.startswith(prefix):
                break
            names.append(k.decode())
    return names


def _metric_row(problem, layout: Layout, entry: dict) -> tuple[dict[str, float], bool]:
    """Our metrics of one checkpoint from its runs.json entry (NaN where unknown), and whether one of
    them is present but not finite."""
    row, bad = {}, False
    for m in problem.metrics:
        theirs, scale = layout.metrics.get(m, (None, 1.0))
        v = entry.get(theirs) if theirs is not None else None
        row[m] = float(v) * scale if isinstance(v, (int, float)) and not isinstance(v, bool) else math.nan
        bad |= v is not None and not math.isfinite(row[m])
    return row, bad


def _checkpoint(txn, key: str, i: int, problem, layout: Layout, entry: dict) -> tuple[np.ndarray, dict[str, float]]:
    """One checkpoint's vector and metrics; ``_Stop`` when it is missing, of another shape or diverged."""
    import lmdb

    try:
        raw, arch = txn.get(key.encode()), txn.get(f"{key}_arch".encode())
    except lmdb.Error as e:
        raise _Stop("corrupt", f"LMDB error at {key}: {type(e).__name__}") from None
    if raw is None:
        raise _Stop("corrupt", f"{key} listed in runs.json but not in the LMDB")
    expected = [layer.numel for layer in problem.layers]
    sizes = np.frombuffer(arch, dtype="<f4").round().astype(np.int64).tolist() if arch is not None else None
    if (sizes is not None and sizes != expected) or len(raw) != 4 * problem.n_params:
        got = sizes if sizes is not None else f"{len(raw) // 4} values"
        raise _Stop("arch_mismatch", f"arch {got} at {key} is not {problem.name}'s {expected}", drop=True)
    vector = np.frombuffer(raw, dtype="<f4")
    metrics, bad_metric = _metric_row(problem, layout, entry)
    finite, small = bool(np.isfinite(vector).all()), bool(np.abs(vector).max(initial=0.0) <= DIVERGED_ABS)
    if not (finite and small) or bad_metric:
        what = "metric" if finite and small else "parameter"
        raise _Stop("diverged", f"non-finite or huge {what} at checkpoint {i} ({key})")
    return vector, metrics


def _read_checkpoints(txn, matches: list, problem, layout: Layout, info: dict | None, statuses: set, notes: list) -> list[tuple]:
    """``(key, vector, metrics, step, epoch)`` of the run's checkpoints in order, up to the first bad one."""
    rows = []
    for i, (match, key) in enumerate(matches):
        entry = (info["checkpoints"].get(key) or {}) if info is not None else {}
        try:
            vector, metrics = _checkpoint(txn, key, i, problem, layout, entry)
        except _Stop as stop:
            statuses.add(stop.status)
            notes.append(stop.note)
            return [] if stop.drop else rows
        rows.append((key, vector, metrics, *_step(layout, match)))
    return rows


def _run_data(problem, rows: list[tuple], status: str, source_ckpts: int, notes: list[str]) -> RunData:
    return RunData(
        params=np.stack([r[1] for r in rows]).astype(np.float32) if rows else np.empty((0, problem.n_params), np.float32),
        metrics={m: np.asarray([r[2][m] for r in rows], dtype=np.float64) for m in problem.metrics},
        keys=[r[0] for r in rows], steps=[r[3] for r in rows], epochs=[r[4] for r in rows],
        status=status, source_ckpts=source_ckpts, notes=notes,
    )


def _read_run(folder: str, run: str, problem, layout: Layout, n_ckpts: int) -> RunData:
    import lmdb

    statuses, notes = set(), []
    done = os.path.isfile(os.path.join(folder, "DONE.txt"))
    if not done:
        statuses.add("unfinished")
        notes.append("no DONE.txt")
    info = _run_json(folder, run)
    if isinstance(unreadable := _runs_json(folder), str):  # a damaged file is recorded, the import goes on
        statuses.add("corrupt")
        notes.append(unreadable)
    try:
        env = _open_lmdb(folder)
    except lmdb.Error as e:
        return _run_data(problem, [], "corrupt", 0, notes + [f"LMDB cannot be opened: {type(e).__name__}"])
    try:
        with env.begin(buffers=False) as txn:
            matches = [(layout.key.match(n), n) for n in _listed_names(txn, info, run, done, statuses, notes)]
            matches = sorted(((m, n) for m, n in matches if m and m.group("run") == run), key=lambda mn: _order(layout, mn[0]))
            source_ckpts = len(matches)
            if source_ckpts > n_ckpts:
                statuses.add("truncated")
                notes.append(f"{source_ckpts} checkpoints, the first {n_ckpts} imported")
            rows = _read_checkpoints(txn, matches[:n_ckpts], problem, layout, info, statuses, notes)
    except lmdb.Error as e:
        statuses.add("corrupt")
        notes.append(f"LMDB error: {type(e).__name__}")
        rows, source_ckpts = [], 0
    finally:
        env.close()
    if not statuses and len(rows) < n_ckpts:
        statuses.add("short")
        notes.append(f"{len(rows)} checkpoints, the sweep has {n_ckpts}")
    return _run_data(problem, rows, next((s for s in _PRECEDENCE if s in statuses), "ok"), source_ckpts, notes)


# --- import ------------------------------------------------------------------------------------


def frozen_config(problem_name: str, source: str, plan: list[tuple[str, str]], n_ckpts: int, shard_size: int) -> dict:
    """``config.json`` of an imported sweep: the same fields as a collected one (``recipe`` holds the
    released generation script's settings) plus ``imported`` (from where, in which layout)."""

    problem, layout = layout_for(problem_name)
    try:
        recipe = SweepConfig(problem=problem_name, runs=len(plan), checkpoints=n_ckpts, shard_size=shard_size,
                             **layout.recipe).to_dict()
    except SweepConfigError as e:
        raise InteropError(str(e)) from None
    digest = _plan_digest(plan)
    frozen = {
        "problem": problem_name,
        "recipe": recipe,
        "metrics": list(problem.metrics),
        "layers": [[layer.name, list(layer.shape)] for layer in problem.layers],
        "imported": {
            "from": "G.pt checkpoint dataset (github.com/wpeebles/G.pt, LMDB layout)",
            "dataset": layout.dataset,
            "source": os.path.abspath(source),
            "runs_digest": digest,
            "run_folders": len({d for _, d in plan}),
            "metrics": {m: {"source": t, "scale": s} for m, (t, s) in layout.metrics.items()},
            "note": "errors are percentages in the source and fractions here; train_loss/train_error are of one mini-batch",
        },
    }
    return sweeps.full_config(frozen, len(plan), n_ckpts, problem.n_params)


def check(store_url: str, sweep: str, problem_name: str, source: str, n_ckpts: int, shard_size: int) -> tuple[dict, list]:
    """Everything that can be wrong with an import, checked before anything is written."""
    check_name(sweep)
    layout_for(problem_name)
    if n_ckpts < 1:
        raise InteropError(f"--checkpoints must be positive, got {n_ckpts}")
    if shard_size < 1:
        raise InteropError(f"--shard-size must be positive, got {shard_size}")
    plan = scan(source)
    config = frozen_config(problem_name, source, plan, n_ckpts, shard_size)
    try:
        store = open_store(store_url)
    except StoreError:
        if is_object_store(store_url):
            raise
        return config, plan
    sweeps.check_config(store, sweep, config)  # the same name with another source or settings is refused
    return config, plan


def n_shards(config: dict) -> int:
    return math.ceil(config["n_runs"] / config["recipe"]["shard_size"])


def prepare(store_url: str, sweep: str, problem_name: str, source: str, n_ckpts: int = 200, shard_size: int = 16) -> list[int]:
    """Check, freeze the config and the run list, create the array; return the shards still to do."""
    config, plan = check(store_url, sweep, problem_name, source, n_ckpts, shard_size)
    store = open_store(store_url, create=True)
    if not store.exists(*sweeps.config_path(sweep)):  # the plan before config.json: a sweep with a config has its plan
        store.write_json({"source": os.path.abspath(source), "runs": plan}, "sweeps", sweep, PLAN_FILE)
    sweeps.prepare(store, sweep, config)
    done = sweeps.committed_shards(store, sweep)
    return [s for s in range(n_shards(config)) if s not in done]


def _plan_digest(plan: list) -> str:
    return hashlib.sha256(json.dumps([list(r) for r in plan]).encode()).hexdigest()


@functools.lru_cache(maxsize=4)
def _plan(store_url: str, sweep: str, digest: str) -> tuple[str, list]:
    """The frozen run list of an import (``digest`` from its config: a reused name never sees a stale list)."""
    plan = open_store(store_url).read_json("sweeps", sweep, PLAN_FILE)
    runs = [tuple(r) for r in plan["runs"]]
    if _plan_digest(runs) != digest:
        raise InteropError(f"sweeps/{sweep}/{PLAN_FILE} does not match the sweep's config")
    return plan["source"], runs


def import_plan(store: Store, sweep: str) -> tuple[str, list]:
    """``(source folder, [(run name, folder)])`` of an imported sweep; run r is entry r."""
    config = sweeps.read_config(store, sweep)
    if "imported" not in config:
        raise InteropError(f"sweep {sweep!r} was not imported from a G.pt dataset")
    return _plan(store.url, sweep, config["imported"]["runs_digest"])


def shard_rows(problem, layout: Layout, config: dict, shard: int, runs: list[int], plan: list, source: str) -> tuple[sweeps.ShardRows, dict]:
    """Read one shard's runs from the official folders into the rows a collected shard commits (plus
    where each run and checkpoint came from)."""
    t0 = time.perf_counter()
    C, P = config["n_ckpts"], config["n_params"]
    blocks = np.full((len(runs), C, P), np.nan, dtype=np.float32)
    recipe = config["recipe"]
    lr = recipe.get("lr_min") if recipe.get("lr_min") == recipe.get("lr_max") else math.nan
    records, statuses = [], {}
    for k, run in enumerate(runs):
        name, rel = plan[run]
        data = read_run(os.path.join(source, rel), name, problem, layout, C)
        blocks[k, : len(data.keys)] = data.params
        records.append(collect.RunRows(
            run=run, seed=int(name) if name.isdigit() else -1, lr=lr, status=data.status, steps=data.steps,
            epochs=data.epochs, metrics=data.metrics, checkpoint_columns={"source_key": data.keys},
            run_columns={"source_run": name, "source_dir": rel or ".", "source_ckpts": data.source_ckpts,
                         "note": "; ".join(data.notes)}))
        statuses[data.status] = statuses.get(data.status, 0) + 1
    rows = collect.catalog_rows(problem, shard, records, blocks, time.perf_counter() - t0)
    return rows, statuses


def import_shard(store: Store, sweep: str, shard: int) -> dict:
    """Read one shard's runs from the official folders and commit them (parameter chunks, then the
    ``checkpoints`` file, then the ``runs`` file = the commit). A committed shard is skipped."""
    t0 = time.perf_counter()
    config = sweeps.read_config(store, sweep)
    if "imported" not in config:
        raise InteropError(f"sweep {sweep!r} was not imported from a G.pt dataset")
    if shard in sweeps.committed_shards(store, sweep):
        return {"shard": shard, "skipped": True}
    problem, layout = layout_for(config["problem"])
    source, plan = import_plan(store, sweep)
    if not os.path.isdir(source):
        raise InteropError(f"the source {source} of sweep {sweep!r} is gone")
    K = config["recipe"]["shard_size"]
    runs = list(range(shard * K, min((shard + 1) * K, config["n_runs"])))
    rows, statuses = shard_rows(problem, layout, config, shard, runs, plan, source)
    sweeps.commit_shard(store, sweep, shard, rows, sweeps.writable_params(store, sweep))
    return {"shard": shard, "runs": len(runs), **statuses, "wall_s": time.perf_counter() - t0}


def import_all(store_url: str, sweep: str, problem_name: str, source: str, n_ckpts: int = 200, shard_size: int = 16) -> dict:
    """The whole import in this process, shard by shard (the Prefect flow runs shards as tasks)."""
    todo = prepare(store_url, sweep, problem_name, source, n_ckpts, shard_size)
    store = open_store(store_url)
    for shard in todo:
        import_shard(store, sweep, shard)
    return summarize(store, sweep)


def summarize(store: Store, sweep: str) -> dict:
    """Counts per status and headline numbers of an imported sweep (from the catalog)."""
    runs = sweeps.committed_runs(store, sweep)
    status = runs["status"].to_pylist()
    out = {"runs": len(status), "checkpoints": int(sum(runs["n_ckpts"].to_pylist()))}
    for s in _PRECEDENCE[::-1]:
        if s in status:
            out[s] = status.count(s)
    problem = problems.get(sweeps.read_config(store, sweep)["problem"])
    ok = [v for v, s in zip(runs[f"best_{problem.primary}"].to_pylist(), status) if s == "ok" and v == v]
    if ok:
        out[f"best_{problem.primary}"] = problems.best_of(problem, problem.primary, ok)
    return out


def report_rows(store: Store, sweep: str) -> list[dict]:
    """The runs that did not import cleanly: source run, status and what was wrong."""
    runs = sweeps.committed_runs(store, sweep)
    return [{"run": r, "source_run": n, "status": s, "n_ckpts": c, "note": t}
            for r, n, s, c, t in zip(*(runs[k].to_pylist() for k in ("run", "source_run", "status", "n_ckpts", "note")))
            if s != "ok"]


# --- export ------------------------------------------------------------------------------------


def checkpoint_vector(store: Store, sweep: str, run: int, ckpt: int) -> tuple[str, np.ndarray, dict]:
    """``(problem, vector, metadata)`` of one committed checkpoint of a sweep."""
    config = sweeps.read_config(store, sweep)
    runs = sweeps.committed_runs(store, sweep)
    ids = runs["run"].to_pylist()
    if run not in ids:
        raise InteropError(f"sweep {sweep!r} has no committed run {run} (runs 0..{config['n_runs'] - 1}, {len(ids)} committed)")
    row = runs.slice(ids.index(run), 1).to_pylist()[0]
    if not 0 <= ckpt < row["n_ckpts"]:
        raise InteropError(f"run {run} of sweep {sweep!r} has {row['n_ckpts']} checkpoints (status {row['status']}); --ckpt {ckpt} is not one of them")
    vector = sweeps.read_blocks(store, sweep, [run])[0, ckpt]  # verified against the run's digest
    table = catalog.query(store, "select * from checkpoints where sweep = ? and run = ? and ckpt = ?", [sweep, int(run), int(ckpt)])
    meta = {"sweep": sweep, "run": str(run), "ckpt": str(ckpt)}
    for k, v in (table.to_pylist()[0].items() if table.num_rows else []):
        if k not in ("sweep", "run", "ckpt") and v is not None:
            meta[k] = str(v)
    return config["problem"], vector, meta


def eval_vector(store: Store, eval: str, row: int) -> tuple[str, np.ndarray, dict]:
    """``(problem, vector, metadata)`` of row ``row`` of an evaluation (``evals/<eval>/params.zarr`` is
    row-aligned with ``results.parquet``, which is written last and so marks a complete evaluation)."""
    results = evals.read_results(store, eval)
    if not 0 <= row < results.num_rows:
        raise InteropError(f"evaluation {eval!r} has rows 0..{results.num_rows - 1}; --row {row} is not one of them")
    record = results.slice(row, 1).to_pylist()[0]
    array = evals.open_params(store, eval)
    if array.shape[0] != results.num_rows:
        raise InteropError(f"evaluation {eval!r}: params.zarr has {array.shape[0]} rows, results.parquet {results.num_rows}")
    vector = np.asarray(array[row], dtype=np.float32)
    meta = {"eval": eval, "row": str(row), **{k: str(v) for k, v in record.items() if v is not None and k != "eval"}}
    return record["problem"], vector, meta


def state_dict(problem_name: str, vector: np.ndarray) -> dict:
    import torch

    problem = problems.get(problem_name)
    if vector.shape != (problem.n_params,):
        raise InteropError(f"a {problem_name} vector has {problem.n_params} values, this one {vector.shape}")
    if not np.isfinite(vector).all():
        raise InteropError("the parameter vector has non-finite values (a diverged or missing checkpoint)")
    return {k: v.contiguous() for k, v in problem.state_dict(torch.from_numpy(vector.copy())).items()}


def export(store: Store | str, out: str, *, sweep: str | None = None, run: int | None = None, ckpt: int | None = None,
           eval: str | None = None, row: int | None = None) -> dict:
    """Write one checkpoint (``sweep``/``run``/``ckpt``) or one generated vector (``eval``/``row``) as a
    ``state_dict`` for ``problems.get(problem).module()``: safetensors (metadata: problem and source),
    or a plain torch ``.pt``/``.pth`` file when ``out`` ends so. Returns the metadata. ``store`` may be a
    URL: it is opened after the arguments are checked."""
    by_ckpt = sweep is not None or run is not None or ckpt is not None
    by_eval = eval is not None or row is not None
    if by_ckpt == by_eval:
        raise InteropError("name either --sweep, --run and --ckpt, or --eval and --row")
    if by_ckpt and (sweep is None or run is None or ckpt is None):
        raise InteropError("--sweep needs --run and --ckpt")
    if by_eval and (eval is None or row is None):
        raise InteropError("--eval needs --row")
    check_out_folder(out)
    if isinstance(store, str):
        store = open_store(store)
    if by_ckpt:
        problem_name, vector, meta = checkpoint_vector(store, sweep, int(run), int(ckpt))
    else:
        problem_name, vector, meta = eval_vector(store, eval, int(row))
    meta = {"problem": problem_name, "store": store.url, **meta}
    write_state_dict(state_dict(problem_name, vector), out, meta)
    return meta


def check_out_folder(out: str) -> None:
    """The folder an output file goes into must exist (checked before anything is read or written)."""
    parent = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(parent):
        raise InteropError(f"folder {parent} does not exist")


def write_state_dict(tensors: dict, out: str, meta: dict[str, str]) -> None:
    """A ``state_dict`` as safetensors (with ``meta``), or as a plain torch file when ``out`` ends in
    ``.pt``/``.pth``."""
    if out.endswith((".pt", ".pth")):
        import torch

        torch.save(tensors, out)
    else:
        from safetensors.torch import save_file

        save_file(tensors, out, metadata=meta)
