"""A sweep in the store: frozen config, parameter array, catalog rows, and the shard commit protocol.

Layout (DESIGN.md): ``sweeps/<sweep>/config.json``, ``sweeps/<sweep>/params.zarr`` and the catalog's
``checkpoints`` and ``runs`` partitions ``sweep=<sweep>``.

Commit protocol for one shard: (1) write each run's parameter chunk, (2) write the shard's
``checkpoints`` file, (3) write the shard's ``runs`` file. Step 3 is the commit: until it exists the
shard does not count, and a later collect redoes it, overwriting the same chunks and files, so every
run ends up in the catalog exactly once however often a shard was attempted.

Two collects of one sweep at once (two machines, a retried deployment next to a stuck one): the first
to write ``config.json`` freezes it (a conditional create) and the other must agree with it; a shard is
trained by whoever holds its claim, ``sweeps/<sweep>/claims/shard-NNNNNN.json``, created the same way
and renewed while training. The other collect waits for that shard's commit instead of redoing it, and
takes the claim over only once it is stale: not renewed for ``LEASE_S``, or its process on this host is gone.
"""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import zarr

from storage import catalog, params
from storage.store import Store, StoreError, check_name
from storage.watchdog import process_exists

FORMAT = 1


def config_path(sweep: str) -> tuple[str, ...]:
    return ("sweeps", sweep, "config.json")


def params_path(sweep: str) -> tuple[str, ...]:
    return ("sweeps", sweep, "params.zarr")


def list_sweeps(store: Store) -> list[str]:
    return [s for s in store.ls("sweeps") if store.exists(*config_path(s))]


def read_config(store: Store, sweep: str) -> dict:
    if not store.exists(*config_path(sweep)):
        known = ", ".join(list_sweeps(store)) or "none"
        raise StoreError(f"no sweep {sweep!r} in store {store.url} (sweeps: {known})")
    return store.read_json(*config_path(sweep))


def full_config(frozen: dict, n_runs: int, n_ckpts: int, n_params: int) -> dict:
    return {**frozen, "format": FORMAT, "n_runs": n_runs, "n_ckpts": n_ckpts, "n_params": n_params}


def check_config(store: Store, sweep: str, config: dict) -> bool:
    """True if the sweep exists with exactly this config, False if it does not exist yet; refuses a
    different config under an existing name."""
    check_name(sweep)
    if not store.exists(*config_path(sweep)):
        return False
    existing = store.read_json(*config_path(sweep))
    if existing != config:
        diff = sorted(k for k in set(existing) | set(config) if existing.get(k) != config.get(k))
        raise StoreError(f"sweep {sweep!r} already exists with another config (differs in: {', '.join(diff)}); choose a new --sweep name")
    return True


def prepare(store: Store, sweep: str, config: dict) -> zarr.Array:
    """Freeze ``config`` (from ``full_config``) as the sweep's config, or check it equals the one frozen
    before, and create the parameter array."""
    if not check_config(store, sweep, config):
        if not store.create_json(config, *config_path(sweep)):  # another collect froze it first: it must agree
            check_config(store, sweep, config)
    return params.create_params(store, params_path(sweep), config["n_runs"], config["n_ckpts"], config["n_params"])


@dataclass
class ShardRows:
    """What one shard commits: parameter blocks for its runs and its catalog rows."""

    runs: list[int]
    blocks: np.ndarray  # float32 [K, C, P]
    checkpoints: pa.Table
    run_rows: pa.Table


def writable_params(store: Store, sweep: str) -> zarr.Array:
    cfg = read_config(store, sweep)
    return params.create_params(store, params_path(sweep), cfg["n_runs"], cfg["n_ckpts"], cfg["n_params"])


def commit_shard(store: Store, sweep: str, shard: int, rows: ShardRows, array: zarr.Array) -> None:
    write_blocks(array, rows.runs, rows.blocks)
    catalog.write_shard(store, "checkpoints", sweep, shard, rows.checkpoints)
    catalog.write_shard(store, "runs", sweep, shard, rows.run_rows)  # the commit


def write_blocks(array: zarr.Array, runs: list[int], blocks: np.ndarray) -> None:
    """Write run ``runs[k]``'s block ``blocks[k]`` into its row. A run is one whole chunk, so writers never share
    a chunk; each range of consecutive runs is one write, whose chunks zarr encodes and stores
    concurrently (a shard's commit 1.6x faster than run by run)."""
    for positions, first, stop in consecutive_ranges(runs):
        array[first:stop] = blocks[positions]


def committed_shards(store: Store, sweep: str) -> set[int]:
    return catalog.committed_shards(store, sweep)


def committed_runs(store: Store, sweep: str) -> pa.Table:
    table = catalog.read_sweep_runs(store, sweep)
    if table is None:
        raise StoreError(f"sweep {sweep!r} has no committed runs yet")
    return table.sort_by("run")


def run_digests(store: Store, sweep: str) -> dict[int, tuple[int, str]]:
    """Each committed run's checkpoints and the digest of its block, as the commit recorded them."""
    t = committed_runs(store, sweep)
    return {r: (n, d) for r, n, d in zip(t["run"].to_pylist(), t["n_ckpts"].to_pylist(), t["digest"].to_pylist())}


def read_blocks(store: Store, sweep: str, runs: list[int] | np.ndarray,
                digests: dict[int, tuple[int, str]] | None = None) -> np.ndarray:
    """Parameter blocks ``[len(runs), C, P]`` of the given committed runs, each verified against the
    digest its commit recorded (``digests`` from ``run_digests``; read here when not given): a flipped
    bit, a truncated or a missing chunk is one line naming the sweep and run, never data. Whole
    run-chunks are read (random row reads from object storage are slow; whole chunks are fast)."""
    array = params.open_params(store, *params_path(sweep))
    runs = np.asarray(runs, dtype=np.int64)
    if len(runs) == 0:
        return np.empty((0, *array.shape[1:]), dtype=np.float32)
    digests = run_digests(store, sweep) if digests is None else digests
    # each range of consecutive runs is read as one slice; zarr fetches its chunks concurrently
    out = np.empty((len(runs), *array.shape[1:]), dtype=np.float32)
    for positions, first, stop in consecutive_ranges(runs):
        try:
            block = array[first:stop]
        except Exception as e:  # a chunk the codec cannot decode: find the run it belongs to
            bad = next((r for r in range(first, stop) if _unreadable(array, r)), first)
            raise StoreError(f"sweep {sweep!r} run {bad}: its parameters cannot be read ({type(e).__name__}); "
                             f"`gptpipe verify --sweep {sweep}` lists every damaged run") from None
        out[positions] = block
    for run, block in zip(runs.tolist(), out):
        if problem := check_block(digests, run, block):
            raise StoreError(f"sweep {sweep!r} run {run}: {problem}; `gptpipe verify --sweep {sweep}` lists every damaged run")
    return out


def consecutive_ranges(runs: list[int] | np.ndarray) -> list[tuple[np.ndarray | slice, int, int]]:
    """The runs (distinct, in any order) as ranges of consecutive runs: ``(positions in runs, first run,
    last run + 1)`` for each, the positions in run order. Positions that are themselves consecutive (a
    shard's runs, in order) come as a slice, so indexing a block array with them is a view, not a copy: a
    fresh 80 MB copy per commit stalled it for up to a second at a time on first touch of its pages."""
    runs = np.asarray(runs, dtype=np.int64)
    order = np.argsort(runs)
    breaks = np.flatnonzero(np.diff(runs[order]) != 1) + 1
    return [(as_slice(positions), int(runs[positions[0]]), int(runs[positions[-1]]) + 1)
            for positions in np.split(order, breaks) if len(positions)]


def as_slice(positions: np.ndarray) -> np.ndarray | slice:
    first = int(positions[0])
    return slice(first, first + len(positions)) if np.array_equal(positions, np.arange(first, first + len(positions))) else positions


def _unreadable(array: zarr.Array, run: int) -> bool:
    try:
        array[run]
        return False
    except Exception:
        return True


def check_block(digests: dict[int, tuple[int, str]], run: int, block: np.ndarray) -> str | None:
    """What is wrong with run ``run``'s block, or None."""
    if run not in digests:
        return "not committed"
    n, expected = digests[run]
    if params.digest(block[:n]) != expected:
        return "stored parameters do not match the digest of their commit (damaged or missing chunk)"
    return None


def verify(store: Store, sweep: str) -> tuple[int, list[dict]]:
    """Every committed run of ``sweep`` read back and checked against its digest: how many were
    checked, and the damaged ones as ``{"run", "problem"}`` rows (empty: all intact)."""
    array = params.open_params(store, *params_path(sweep))
    digests, damaged = run_digests(store, sweep), []
    for run in sorted(digests):
        try:
            block = array[run]
        except Exception as e:
            damaged.append({"run": run, "problem": f"cannot be read ({type(e).__name__})"})
            continue
        if problem := check_block(digests, run, block):
            damaged.append({"run": run, "problem": problem})
    return len(digests), damaged


def uncommit_damaged(store: Store, sweep: str, damaged: list[dict]) -> list[int]:
    """Take back the commits of the shards holding ``damaged`` runs (``verify``'s rows), so that the same
    collect (or import) command trains them again; returns those shards."""
    runs = [row["run"] for row in damaged]
    if not runs:
        return []
    shards = sorted({r["shard"] for r in catalog.query(store, "select distinct shard from runs where sweep = ? and run in "
                                                                "(select unnest(?))", [sweep, runs]).to_pylist()})
    for shard in shards:
        catalog.remove_shard(store, sweep, shard)
    return shards


LEASE_S = 120.0  # a claim not renewed for this long belongs to a collect that is gone
RENEW_S = 20.0


def claim_path(sweep: str, shard: int) -> tuple[str, ...]:
    return ("sweeps", sweep, "claims", f"shard-{shard:06d}.json")


_HELD: set[str] = set()  # tokens of the claims this process holds right now


def _stale(claim: dict) -> bool:
    if time.time() - claim.get("at", 0) > LEASE_S:
        return True
    if claim.get("host") == socket.gethostname() and claim.get("pid") == os.getpid():
        return claim.get("token") not in _HELD  # ours, left by an attempt that failed (its release failed too)
    if claim.get("host") == socket.gethostname():
        try:
            pid = int(claim["pid"])
        except (KeyError, ValueError):
            return False
        return not process_exists(pid)  # its process died on this host: no need to wait out the lease
    return False


@dataclass
class ShardClaim:
    """This process's right to train one shard; renewed in the background until released (``with``)."""

    store: Store
    path: tuple[str, ...]
    owner: dict
    _stop: threading.Event = field(default_factory=threading.Event)
    _renewer: threading.Thread | None = None

    def __enter__(self) -> "ShardClaim":
        def renew():
            while not self._stop.wait(RENEW_S):
                self.store.write_json({**self.owner, "at": time.time()}, *self.path)

        self._renewer = threading.Thread(target=renew, daemon=True)
        self._renewer.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._renewer.join()  # a renewal under way would write the file again after its removal
        try:
            self.store.fs.rm_file(self.store.path(*self.path))
        except Exception:  # gone already, or the store is away (often the failure that ended the attempt; S3's
            pass           # client raises its own connection errors, not OSError): this process's retry takes it over
        _HELD.discard(self.owner["token"])  # after the file is gone, so no thread of ours takes it over meanwhile


def claim_shard(store: Store, sweep: str, shard: int) -> ShardClaim | None:
    """The claim on ``shard`` if nobody else holds a live one (else None: another collect trains it)."""
    path = claim_path(sweep, shard)
    owner = {"host": socket.gethostname(), "pid": os.getpid(), "token": uuid.uuid4().hex, "at": time.time()}
    # Held from before the file exists: another thread of this process reading it must not take it for
    # the leftover of a failed attempt of ours.
    _HELD.add(owner["token"])
    try:
        if store.create_json(owner, *path):
            return ShardClaim(store, path, owner)
        held = store.read_json(*path)
        if _stale(held):
            store.write_json(owner, *path)  # taking over a stale claim; two takers: the last write wins
            if store.read_json(*path)["token"] == owner["token"]:
                return ShardClaim(store, path, owner)
    except FileNotFoundError:  # released meanwhile: try again next time
        pass
    except BaseException:  # the store failed us mid-way: a claim file it may have kept is a leftover of ours
        _HELD.discard(owner["token"])
        raise
    _HELD.discard(owner["token"])
    return None
