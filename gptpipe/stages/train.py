"""The train stage: G.pt from one or more sweeps in the store, saved as it goes, resumable.

``load_training_data`` reads the training runs of sweeps (held-out runs kept apart; streamed when
bigger than the memory budget); ``run_training`` trains or resumes a model and saves it every few
hundred steps. The train flow calls it in one process; under ``torchrun`` (one process per GPU)
``gptpipe train`` calls ``train_distributed`` on every rank and only rank 0 writes (docs/multi-gpu.md).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from gptpipe import problems
from gptpipe.evaluation import pages
from gptpipe.evaluation.report import loss_plot
from gptpipe.gpt import distributed
from gptpipe.gpt.pairs import StreamingPairs, resolve_symmetry
from gptpipe.gpt.trainer import TrainConfig, Trainer, describe_device, matmul_peak_flops
from storage import catalog, evals, models, sweeps
from storage.store import Store, StoreError, default_store_url, open_store

HELDOUT_FRAC, HELDOUT_MAX = 0.1, 64
SAVE_EVERY = 500  # steps between saves: what a crash can lose
# Training sets up to this many bytes of parameters are read into memory; bigger ones are streamed
# from the store in groups of whole runs (``gptpipe.pairs.StreamingPairs``). $GPTPIPE_MEMORY_BUDGET
# (bytes) overrides it.
MEMORY_BUDGET = 2 * 1024**3


def memory_budget() -> int:
    return int(float(os.environ.get("GPTPIPE_MEMORY_BUDGET", MEMORY_BUDGET)))


@dataclass
class TrainingData:
    """The training runs of one or more sweeps: their metric values, and their parameters read when first
    used (``params``), so that a model already trained to its steps is checked without reading them."""

    problem: str
    metric: str
    metric_values: np.ndarray  # [R, C]; NaN past a run's n_ckpts (always in memory: small)
    lineage: dict  # sweeps, catalog digest, held-out runs
    best: float  # best metric value among training checkpoints (the top of the prompt range)
    read_all: Callable[[], np.ndarray] | None = field(default=None, repr=False)  # every block; None: over the budget
    read_runs: Callable[[np.ndarray], np.ndarray] | None = field(default=None, repr=False)  # positions -> blocks, streamed only
    _params: np.ndarray | None = field(default=None, repr=False)

    @property
    def streamed(self) -> bool:
        """Bigger than the memory budget: training streams groups of runs through ``read_runs``."""
        return self.read_all is None

    @property
    def params(self) -> np.ndarray | None:
        """float32 ``[R, C, P]`` of the training runs, read on first use; None when streamed."""
        if self._params is None and self.read_all is not None:
            self._params = self.read_all()
        return self._params

    def stream(self, batch_size: int, pairing: str = "mixed", init_frac: float = 0.5, symmetry: str = "auto", seed: int = 0,
               **options):
        """A ``StreamingPairs`` source over these training runs (``options``: group_runs, spans, ...)."""
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
    """The training runs of one or more sweeps of the same problem (ok runs, minus held-out): their metrics
    now, their parameters when training needs them. Up to ``budget`` bytes of parameters (default
    ``memory_budget()``, 2 GiB) are read into memory whole; bigger training sets are streamed in run blocks."""
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
        table = catalog.query(store, f"select run, ckpt, {catalog.column(metric)} as m from checkpoints where sweep = ?", [name])
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
        return TrainingData(problem.name, metric, metric_values, lineage, best, read_runs=run_reader(store, sweep_names, train_lists))

    def read_all() -> np.ndarray:
        parts = [sweeps.read_blocks(store, name, ids) for name, ids in zip(sweep_names, train_lists)]
        return parts[0] if len(parts) == 1 else np.concatenate(parts)  # one sweep: no second copy of its checkpoints

    return TrainingData(problem.name, metric, metric_values, lineage, best, read_all=read_all)


def run_reader(store: Store, sweep_names: list[str], train_lists: list[np.ndarray]) -> Callable[[np.ndarray], np.ndarray]:
    """``read(idx)``: blocks ``[len(idx), C, P]`` of training-set positions ``idx`` (the concatenation of
    every sweep's training runs, in order), read as whole run-chunks from the store."""
    offsets = np.cumsum([0] + [len(t) for t in train_lists])
    digests = [sweeps.run_digests(store, name) for name in sweep_names]  # read once, checked on every read

    def read(idx) -> np.ndarray:
        idx = np.asarray(idx, dtype=np.int64)
        parts, order = [], []
        for k, name in enumerate(sweep_names):
            mine = np.flatnonzero((idx >= offsets[k]) & (idx < offsets[k + 1]))
            if len(mine):
                parts.append(sweeps.read_blocks(store, name, train_lists[k][idx[mine] - offsets[k]], digests[k]))
                order.append(mine)
        out = np.concatenate(parts)
        result = np.empty_like(out)
        result[np.concatenate(order)] = out
        return result

    return read


def lineage_matches(old: dict, new: dict) -> list[str]:
    """Keys that differ between a saved model's lineage and a new request to train it further."""
    def comparable(lineage: dict) -> dict:  # read through today's TrainConfig, so older lineages' keys map onto it
        train = TrainConfig.from_dict(lineage.get("train_config") or {}).to_dict()
        train = {k: v for k, v in train.items() if k not in ("steps", "device", "compile")}  # how, not what, is trained
        return {**{k: lineage.get(k) for k in ("sweeps", "problem", "metric", "catalog_digest")}, "train_config": train}

    a, b = comparable(old), comparable(new)
    return [k for k in a if json.dumps(a[k], sort_keys=True) != json.dumps(b[k], sort_keys=True)]


def sampling_defaults(lineage: dict) -> tuple[str, int, float, float]:
    """The sampler, its steps, the guidance scale and the temperature a model is sampled with unless told
    otherwise (saved with it)."""
    train_config = lineage.get("train_config", {})
    return (train_config.get("sampler", "ddim"), train_config.get("sample_steps", 1), float(train_config.get("guidance", 1.0)),
            float(train_config.get("temperature", 1.0)))


def trained_pairing(lineage: dict) -> str | None:
    """How the model's training pairs were drawn (``--pairing``; None for models saved before it was recorded)."""
    return lineage.get("train_config", {}).get("pairing")


def save_model(store: Store, model: str, trainer: Trainer, lineage: dict) -> None:
    """The trainer's state through a scratch file (one host copy of it, streamed to the store), then the
    log, plot and lineage, then the card."""
    with tempfile.TemporaryDirectory(prefix="gptpipe-save-") as scratch:
        path = os.path.join(scratch, models.STATE)
        trainer.save_state(path)
        models.save(store, model, path,
                    {**lineage, "step": trainer.step, "train_wall_s": round(trainer.wall_s, 2), "code_version": code_version()},
                    trainer.losses, loss_plot(trainer.losses, model))
    write_card(store, model)


@contextmanager
def saved_state(store: Store, model: str):
    """The path of ``model``'s saved state on this machine, read once per machine: a local store's file
    in place; from an object store, one download per node (by its first process, into a name every
    process of the job derives alike) that the node's processes then read, memory-mapped, together."""
    local = models.local_state_path(store, model)
    if local is not None:
        yield local
        return
    job = os.environ.get("TORCHELASTIC_RUN_ID") or os.environ.get("MASTER_PORT") or str(os.getpid())
    path = os.path.join(tempfile.gettempdir(), f"gptpipe-resume-{model}-{job}.safetensors")
    first_on_node = distributed.local_rank() == 0
    if first_on_node:
        models.download_state(store, model, path)
    distributed.barrier()
    try:
        yield path
    finally:
        distributed.barrier()  # every process has read it
        if first_on_node and os.path.exists(path):
            os.remove(path)


def write_card(store: Store, model: str) -> None:
    """(Re)write ``models/<model>/card.html`` from what the store holds: after each save and each evaluation."""
    mine = [s for s in evals.summaries(store) if s.get("model") == model]
    models.write_card(store, model, pages.model_card(model, models.read_lineage(store, model),
                                                     models.read_loss_plot(store, model), mine))


def run_training(data: TrainingData, store: str, model: str, options: dict | None = None, save_every: int | None = None,
                 on_progress: Callable[[int, int, float], None] | None = None) -> dict:
    """Train (or resume) ``model`` on ``data`` until its steps are done; save every ``save_every`` steps
    (rank 0 only). ``options``: ``TrainConfig`` fields the user set (the rest: the preset's, see
    ``TrainConfig.for_preset``). ``on_progress(step, target, recent loss)`` after each save."""
    st = open_store(store)
    config = TrainConfig.for_preset(**(options or {}))
    seed = config.seed
    save_every = SAVE_EVERY if save_every is None else save_every
    if save_every <= 0:
        raise StoreError(f"save_every must be positive, got {save_every}")
    config = replace(config, symmetry=resolve_symmetry(problems.get(data.problem), config.symmetry))  # the lineage names what was used
    lineage = {**data.lineage, "train_config": config.to_dict(), "best": data.best}
    main = distributed.is_main()
    old = models.read_lineage(st, model) if models.exists(st, model) else None
    if old is not None:
        if diff := lineage_matches(old, lineage):
            raise StoreError(f"model {model!r} exists with other {', '.join(diff)}; choose a new --model name")
        if old.get("step", 0) >= config.steps:  # trained: its checkpoints are not even read
            if main:
                print(f"{model} is already at step {old['step']} of {config.steps}")
            return training_summary(model, old["step"], old["step"], old.get("train_wall_s", 0.0), models.read_losses(st, model),
                                    data, processes=distributed.world_size())
    stream = None
    if data.streamed:  # the training set is bigger than the memory budget: stream groups of runs
        world = distributed.world_size()
        stream = data.stream(config.batch_size // max(1, world), config.pairing, config.init_frac, config.symmetry,
                             seed=seed + 1_000_003 * distributed.rank() + 17)
        if main:
            print(f"streaming pairs from {data.lineage['training_runs']} training runs (more than the memory budget)")
    if old is not None:
        with saved_state(st, model) as path:
            trainer = Trainer.from_bytes(data.problem, data.params, data.metric_values, path, config, stream=stream)
        lineage["created_at"] = old.get("created_at")
        if main:
            print(f"resuming {model} at step {trainer.step}")
    else:
        trainer = Trainer(data.problem, data.params, data.metric_values, config, stream=stream)
    lineage["device"] = describe_device(trainer.device)  # what "auto" became: a slow run on the CPU says so
    peak = matmul_peak_flops(trainer.device, torch.bfloat16 if trainer.bf16 else torch.float32)
    if main:
        print(f"training {model} on {lineage['device']} (matmul peak {peak / 1e9:.0f} GFLOP/s)")
    target = config.steps
    resumed_at = trainer.step

    def save():
        # model-FLOPs utilisation, as nanoGPT's estimate_mfu: the model's FLOPs per second against the peak
        per_device = config.batch_size / distributed.world_size()
        lineage["mfu"] = round(trainer.model.flops_per_sample() * per_device * trainer.step / max(trainer.wall_s, 1e-9) / peak, 4)
        if main:
            save_model(st, model, trainer, lineage)
        distributed.barrier()  # no rank runs ahead of a save it might resume from

    try:
        while trainer.step < target:
            trainer.train(min(target, trainer.step + save_every))
            save()
            recent = sum(trainer.losses[-100:]) / len(trainer.losses[-100:])
            if on_progress is not None:
                on_progress(trainer.step, target, recent)
            if main:
                print(f"step {trainer.step}/{target}: loss {recent:.4f}, model-FLOPs utilisation {lineage['mfu']:.1%}")
        if not trainer.losses:
            save()
    finally:
        trainer.close()
    return training_summary(model, trainer.step, resumed_at, trainer.wall_s, trainer.losses, data, distributed.world_size())


def training_summary(model: str, step: int, resumed_at: int, wall_s: float, losses: list[float], data: TrainingData,
                     processes: int) -> dict:
    recent = losses[-100:]
    return {"model": model, "step": step, "resumed_at_step": resumed_at, "train_wall_s": round(wall_s, 1),
            "final_loss": float(sum(recent) / max(1, len(recent))), "training_runs": data.lineage["training_runs"],
            "best_in_sweeps": data.best, "streamed": data.streamed, "processes": processes}


def train_distributed(sweeps: list[str], model: str, store: str | None = None, metric: str | None = None,
                      options: dict | None = None, save_every: int | None = None, memory_budget: int | None = None) -> dict:
    """``run_training`` on every rank of a ``torchrun`` job (no Prefect flow run: N processes would make
    N flow runs and Prefect's retries would desynchronise the ranks). Rank 0 writes to the store."""
    distributed.init_from_env((options or {}).get("device", "auto"))
    try:
        store = store or default_store_url()
        seed = (options or {}).get("seed", 0)
        data = load_training_data(open_store(store), sweeps, metric, seed, memory_budget)
        return run_training(data, store, model, options, save_every)
    finally:
        distributed.shutdown()
