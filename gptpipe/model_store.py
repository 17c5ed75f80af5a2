"""G.pt models in the store: training data from sweeps, held-out runs, saving and loading, lineage.

``models/<model>/``:
    state.safetensors   raw + EMA weights, optimiser state, configs, step (resumable; no pickle)
    lineage.json        sweeps, catalog digest, held-out runs, the training config, code version
    train_log.csv       step, loss
    train_loss.png      the training loss curve
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
from dataclasses import dataclass, field
from typing import Callable
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from gptpipe import problems
from gptpipe.training import TrainConfig
from storage import catalog, sweeps
from storage.store import Store, StoreError

STATE = "state.safetensors"
HELDOUT_FRAC, HELDOUT_MAX = 0.1, 64
# Training sets up to this many bytes of parameters are read into memory; bigger ones are streamed
# from the store in groups of whole runs (``gptpipe.pairs.StreamingPairs``). $GPTPIPE_MEMORY_BUDGET
# (bytes) overrides it.
MEMORY_BUDGET = 2 * 1024**3


def memory_budget() -> int:
    return int(float(os.environ.get("GPTPIPE_MEMORY_BUDGET", MEMORY_BUDGET)))


@dataclass
class TrainingData:
    problem: str
    metric: str
    params: np.ndarray | None  # float32 [R, C, P] of the training runs; None when streamed
    metric_values: np.ndarray  # [R, C]; NaN past a run's n_ckpts (always in memory: small)
    lineage: dict  # sweeps, catalog digest, held-out runs
    best: float  # best metric value among training checkpoints (the top of the prompt range)
    read_runs: Callable[[np.ndarray], np.ndarray] | None = field(default=None, repr=False)  # training-set positions -> blocks

    @property
    def streamed(self) -> bool:
        return self.params is None

    def stream(self, batch_size: int, pairing: str = "mixed", init_frac: float = 0.5, symmetry: str = "auto", seed: int = 0,
               **options):
        """A ``StreamingPairs`` source over these training runs (``options``: group_runs, spans, ...)."""
        from gptpipe.pairs import StreamingPairs

        read = self.read_runs or (lambda idx: self.params[idx])
        return StreamingPairs(problems.get(self.problem), read, self.metric_values, batch_size, pairing, init_frac,
                              symmetry, seed=seed, **options)


def code_version() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def heldout_runs(run_ids: np.ndarray, seed: int) -> np.ndarray:
    """A fixed random tenth of a sweep's ok runs (at most 64), never seen in training."""
    n = min(HELDOUT_MAX, max(1, int(len(run_ids) * HELDOUT_FRAC)))
    return np.sort(np.random.default_rng(seed).choice(run_ids, size=n, replace=False))


def load_training_data(store: Store, sweep_names: list[str], metric: str | None = None, seed: int = 0,
                       budget: int | None = None) -> TrainingData:
    """The training runs of one or more sweeps of the same problem (ok runs, minus held-out). Small sweeps
    are cached in memory (``params``); when their parameters exceed ``budget`` bytes (default
    ``memory_budget()``, 2 GiB) only the metrics are read and ``read_runs`` streams run blocks later."""
    budget = memory_budget() if budget is None else budget
    if not sweep_names:
        raise StoreError("name at least one --sweep")
    configs = {s: sweeps.read_config(store, s) for s in sweep_names}
    problem_names = {c["problem"] for c in configs.values()}
    if len(problem_names) != 1:
        raise StoreError(f"sweeps {', '.join(sweep_names)} are of different problems: {', '.join(sorted(problem_names))}")
    problem = problems.get(problem_names.pop())
    metric = metric or problem.primary
    if metric not in problem.metrics:
        raise StoreError(f"problem {problem.name} has no metric {metric!r} (metrics: {', '.join(problem.metrics)})")
    blocks, values, heldout, digest = [], [], {}, hashlib.sha256()
    train_lists, n_ckpts, n_params = [], set(), set()
    for name in sweep_names:
        n_ckpts.add(int(configs[name]["n_ckpts"]))
        n_params.add(int(configs[name]["n_params"]))
    if len(n_ckpts) != 1:
        raise StoreError("sweeps with different checkpoints per run cannot be trained together yet")
    for name in sweep_names:
        runs = sweeps.committed_runs(store, name)
        ok = runs.filter(np.asarray(runs["status"].to_pylist()) == "ok")
        run_ids = np.asarray(ok["run"].to_pylist(), dtype=np.int64)
        if len(run_ids) < 2:
            raise StoreError(f"sweep {name!r} has {len(run_ids)} usable runs; need at least 2")
        held = heldout_runs(run_ids, seed)
        heldout[name] = held.tolist()
        train_ids = np.setdiff1d(run_ids, held)
        for r, d in zip(runs["run"].to_pylist(), runs["digest"].to_pylist()):
            digest.update(f"{name}/{r}/{d};".encode())
        train_lists.append(train_ids)
        table = catalog.query(store, f"select run, ckpt, {metric} as m from checkpoints where sweep = '{name}'")
        grid = np.full((configs[name]["n_runs"], configs[name]["n_ckpts"]), np.nan)
        grid[np.asarray(table["run"]), np.asarray(table["ckpt"])] = np.asarray(table["m"], dtype=np.float64)
        values.append(grid[train_ids])
    metric_values = np.concatenate(values)
    n_train = sum(len(t) for t in train_lists)
    nbytes = n_train * n_ckpts.pop() * max(n_params) * 4
    lineage = {"sweeps": sweep_names, "problem": problem.name, "metric": metric, "catalog_digest": digest.hexdigest(),
               "heldout_runs": heldout, "training_runs": int(n_train)}
    best = float(problems.best_of(problem, metric, metric_values))
    if nbytes > budget:
        return TrainingData(problem.name, metric, None, metric_values, lineage, best,
                            read_runs=run_reader(store, sweep_names, train_lists))
    params = np.concatenate([sweeps.read_blocks(store, name, ids) for name, ids in zip(sweep_names, train_lists)])
    return TrainingData(problem.name, metric, params, metric_values, lineage, best)


def run_reader(store: Store, sweep_names: list[str], train_lists: list[np.ndarray]) -> Callable[[np.ndarray], np.ndarray]:
    """``read(idx)``: blocks ``[len(idx), C, P]`` of training-set positions ``idx`` (the concatenation of
    every sweep's training runs, in order), read as whole run-chunks from the store."""
    offsets = np.cumsum([0] + [len(t) for t in train_lists])

    def read(idx) -> np.ndarray:
        idx = np.asarray(idx, dtype=np.int64)
        parts, order = [], []
        for k, name in enumerate(sweep_names):
            mine = np.flatnonzero((idx >= offsets[k]) & (idx < offsets[k + 1]))
            if len(mine):
                parts.append(sweeps.read_blocks(store, name, train_lists[k][idx[mine] - offsets[k]]))
                order.append(mine)
        out = np.concatenate(parts)
        result = np.empty_like(out)
        result[np.concatenate(order)] = out
        return result

    return read


def model_exists(store: Store, model: str) -> bool:
    return store.exists("models", model, STATE)


def list_models(store: Store) -> list[str]:
    return [m for m in store.ls("models") if model_exists(store, m)]


def newest_model(store: Store) -> str:
    models = list_models(store)
    if not models:
        raise StoreError(f"no models in store {store.url}; train one with `gptpipe train`")
    return max(models, key=lambda m: read_lineage(store, m).get("updated_at", ""))


def read_lineage(store: Store, model: str) -> dict:
    if not store.exists("models", model, "lineage.json"):
        raise StoreError(f"no model {model!r} in store {store.url} (models: {', '.join(list_models(store)) or 'none'})")
    return store.read_json("models", model, "lineage.json")


def read_state(store: Store, model: str) -> bytes:
    read_lineage(store, model)  # one clear line if the model is missing
    return store.fs.cat_file(store.path("models", model, STATE))


def save(store: Store, model: str, state: bytes, lineage: dict, losses: list[float], step: int, wall_s: float) -> None:
    """State first, lineage last: a model whose lineage names step S has a state of at least step S."""
    store.write_bytes(state, "models", model, STATE)
    log = "step,loss\n" + "".join(f"{i + 1},{v:.6g}\n" for i, v in enumerate(losses))
    store.write_bytes(log.encode(), "models", model, "train_log.csv")
    store.write_bytes(loss_plot(losses, model), "models", model, "train_loss.png")
    now = datetime.now(timezone.utc).isoformat()
    store.write_json({**lineage, "step": step, "train_wall_s": round(wall_s, 2), "code_version": code_version(),
                      "created_at": lineage.get("created_at", now), "updated_at": now}, "models", model, "lineage.json")


def loss_plot(losses: list[float], title: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    y = np.asarray(losses, dtype=float)
    if len(y):
        ax.plot(np.arange(1, len(y) + 1), y, lw=0.5, alpha=0.4, label="step")
        w = max(1, len(y) // 50)
        ax.plot(np.arange(w, len(y) + 1), np.convolve(y, np.ones(w) / w, mode="valid"), lw=1.5, label=f"mean of {w}")
        ax.set_yscale("log")
    ax.set_xlabel("training step")
    ax.set_ylabel("diffusion loss")
    ax.set_title(f"G.pt {title}")
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def lineage_matches(old: dict, new: dict) -> list[str]:
    """Keys that differ between a saved model's lineage and a new request to train it further."""
    def comparable(lineage: dict) -> dict:  # read through today's TrainConfig, so older lineages' keys map onto it
        train = TrainConfig.from_dict(lineage.get("train_config") or {}).to_dict()
        train = {k: v for k, v in train.items() if k not in ("steps", "device")}
        return {**{k: lineage.get(k) for k in ("sweeps", "problem", "metric", "catalog_digest")}, "train_config": train}

    a, b = comparable(old), comparable(new)
    return [k for k in a if json.dumps(a[k], sort_keys=True) != json.dumps(b[k], sort_keys=True)]
