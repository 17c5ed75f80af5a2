"""Where G.pt's training pairs come from.

A training example is a pair of checkpoints (start i, target j) of one run, i < j but for "two-way" and "stay" pairing. Two sources:

- **in memory** (``Trainer`` with ``params [R, C, P]``): small sweeps are cached in memory and every
  batch draws pairs from all runs at once (the default while the training set fits the memory budget).
- **streaming** (``StreamingPairs``): for sweeps too big for memory (the paper trains on ~100k runs).
  A background thread reads a random *group* of whole run-chunks from the store (random row reads from
  object storage are slow; whole chunks are fast), draws many batches of pairs inside that group
  (``batches_per_group``; reading costs far more than drawing, see ``bench/gpt.py loader``), reorders
  their hidden units there (``symmetry``), and hands finished batches to the training loop through a
  bounded queue. Only the group in flight and the queued batches are in
  memory. A group is a few random contiguous spans of training runs, so each span is one slice read
  whose chunks the store fetches concurrently (runs are i.i.d., their order carries no information).

Both sources draw the pair indices with ``sample_pair_indices`` (the same distribution).
"""

from __future__ import annotations

import queue
import threading
from typing import Callable

import numpy as np
import torch


# "two-way" pairing: trained only on forward pairs of PPO runs (whose returns mostly rise), a model answers
# a prompt below the start with an improvement anyway (docs/gpt-ablations.md, CartPole)
REVERSED_FRAC = 0.25
# "stay" pairing: pairs whose target is the start itself. Forward pairs never ask for the value a network
# already has, so what G.pt returns for prompts at or just below its start is learned from nothing and
# changed from one training to the next (a CartPole model asked for its start's return delivered a third of
# the way to the best, another the start: docs/gpt-ablations.md); these pairs teach it to keep the network
STAY_FRAC = 0.1


def valid_counts(params: torch.Tensor, metric: torch.Tensor) -> torch.Tensor:
    """Checkpoints usable per run: the leading ones with finite parameters and metric."""
    # block by block: torch.isfinite makes temporaries several times its input (9 GB for the mnist_mlp demo's 5.2 GB)
    finite = torch.cat([torch.isfinite(block).all(-1) for block in params.split(256)]) if len(params) else torch.isfinite(metric)
    ok = finite & torch.isfinite(metric)
    return torch.cumprod(ok.int(), dim=1).sum(1)


def sample_pair_indices(n_valid: torch.Tensor, n: int, generator: torch.Generator, pairing: str = "mixed",
                        init_frac: float = 0.5) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(run, i, j)`` index tensors ``[n]`` with both < n_valid[run] (every n_valid >= 2), i != j but for "stay".

    "uniform" (the paper): a spacing uniform in 1..last, then a start uniform among those that fit;
    "init": i = 0; "mixed": a fraction ``init_frac`` with i = 0, the rest uniform; "two-way": "mixed"
    with a quarter of the pairs reversed (i > j), so the model also sees targets worse than its start;
    "stay": "mixed" with a tenth of the pairs' targets the start itself (j = i)."""
    g = generator
    run = torch.randint(0, len(n_valid), (n,), generator=g)
    last = (n_valid[run] - 1).float()  # >= 1
    spacing = 1 + (torch.rand(n, generator=g) * last).long()
    i = (torch.rand(n, generator=g) * (last + 1 - spacing)).long()
    if pairing != "uniform":
        from_init = torch.rand(n, generator=g) < (1.0 if pairing == "init" else init_frac)
        i = torch.where(from_init, torch.zeros_like(i), i)
        j_init = 1 + (torch.rand(n, generator=g) * last).long()
        j = torch.where(from_init, j_init, i + spacing)
    else:
        j = i + spacing
    if pairing == "two-way":
        backward = torch.rand(n, generator=g) < REVERSED_FRAC
        i, j = torch.where(backward, j, i), torch.where(backward, i, j)
    if pairing == "stay":
        j = torch.where(torch.rand(n, generator=g) < STAY_FRAC, i, j)
    return run, i, j


SYMMETRIES = ("auto", "permute", "canonical", "none")


def resolve_symmetry(problem, symmetry: str) -> str:
    """How training handles the hidden units' permutation symmetry:

    - "permute" (the paper): both checkpoints of a pair get the same random reordering of their units,
      so G.pt learns from every ordering;
    - "canonical": both are put in the canonical order of the start (``problem.canonical_permutation``),
      so G.pt only ever sees one ordering, and units in the same position do similar jobs across runs;
    - "none": pairs as stored.

    "auto" is "canonical" for problems that define a canonical order (cartpole), else "permute"."""
    if symmetry not in SYMMETRIES:
        raise ValueError(f"symmetry must be one of {', '.join(SYMMETRIES)}, not {symmetry!r}")
    if symmetry == "auto":
        symmetry = "canonical" if problem.has_canonical_order else "permute"
    if symmetry == "canonical" and not problem.has_canonical_order:
        raise ValueError(f"problem {problem.name} has no canonical order of its units; use symmetry 'permute' or 'none'")
    return symmetry


def gather_pairs(problem, params: torch.Tensor, metric: torch.Tensor, n_valid: torch.Tensor, n: int,
                 generator: torch.Generator, pairing: str, init_frac: float, symmetry: str) -> dict[str, torch.Tensor]:
    """One batch of raw pairs from ``params [R, C, P]``: theta_i, theta_j (reordered jointly as
    ``symmetry`` says, see ``resolve_symmetry``), metric_i, metric_j, and the indices they came from
    (``run`` into ``params``, ``i``, ``j``)."""
    run, i, j = sample_pair_indices(n_valid, n, generator, pairing, init_frac)
    theta_i, theta_j = params[run, i], params[run, j]
    symmetry = resolve_symmetry(problem, symmetry)
    if symmetry != "none":
        perm = problem.sample_permutation(n, generator) if symmetry == "permute" else problem.canonical_permutation(theta_i)
        theta_i = problem.permute(theta_i, perm=perm)
        theta_j = problem.permute(theta_j, perm=perm)
    return {"theta_i": theta_i, "theta_j": theta_j, "metric_i": metric[run, i], "metric_j": metric[run, j],
            "run": run, "i": i, "j": j}


class StreamingPairs:
    """Batches of pairs streamed from a training set that stays in the store.

    ``read_runs(idx)``: parameter blocks ``float32 [len(idx), C, P]`` of training runs ``idx`` (positions
    0..R-1 in the training set, sorted ascending); ``metric [R, C]``: the prompted metric of every
    training checkpoint (small: it stays in memory). Each rank of a multi-process job passes its own
    ``seed`` so ranks read different groups and draw different pairs.

    ``mix`` groups are held at once and every batch draws its pairs from all of them; one group is
    replaced every ``batches_per_group`` batches. A batch then spans ``mix`` x ``group_runs`` runs (at paper
    size a 256 MiB group is ~40 runs: alone, 64 batches of 1,024 pairs from 40 runs are strongly
    correlated), for ``mix`` x the memory and the same reads per pair.

    ``next()`` returns a dict like ``gather_pairs`` plus ``group_runs`` (the training-set positions of
    the groups the batch came from, for tests). Use as a context manager or call ``close()``."""

    def __init__(self, problem, read_runs: Callable[[np.ndarray], np.ndarray], metric, batch_size: int,
                 pairing: str = "mixed", init_frac: float = 0.5, symmetry: str = "auto", group_runs: int = 512,
                 spans: int = 16, batches_per_group: int = 64, prefetch: int = 8, seed: int = 0,
                 group_bytes: int = 256 * 2**20, mix: int = 4):
        self.problem = problem
        self.read_runs = read_runs
        self.metric = torch.as_tensor(np.asarray(metric), dtype=torch.float32)
        self.n_runs = len(self.metric)
        if self.n_runs < 1:
            raise ValueError("no training runs to stream from")
        self.batch_size = batch_size
        self.pairing, self.init_frac = pairing, init_frac
        self.symmetry = resolve_symmetry(problem, symmetry)
        self.group_bytes = group_bytes
        self.group_runs = min(group_runs, self.n_runs)  # capped by group_bytes once a run's size is known
        self.spans = max(1, min(spans, self.group_runs))
        self.batches_per_group = batches_per_group
        self.mix = max(1, mix)
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)
        self.rng = np.random.default_rng(seed)
        self.queue: queue.Queue = queue.Queue(maxsize=prefetch)
        self.stop = threading.Event()
        self.thread: threading.Thread | None = None
        self.groups_read = 0
        self.runs_read = 0

    # --- groups -------------------------------------------------------------------------------
    def choose_group(self, rng: np.random.Generator | None = None) -> np.ndarray:
        """Sorted training-set positions: ``spans`` random contiguous spans, ``group_runs`` runs in all."""
        rng = rng or self.rng
        if self.group_runs >= self.n_runs:
            return np.arange(self.n_runs)
        span = max(1, self.group_runs // self.spans)
        starts = rng.choice(self.n_runs - span + 1, size=self.spans, replace=False)
        return np.unique(np.concatenate([np.arange(s, s + span) for s in starts]))

    def read_group(self, idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, np.ndarray]:
        """``(params, metric, n_valid, idx)`` of the usable runs (>= 2 checkpoints) among ``idx``."""
        params = torch.from_numpy(np.ascontiguousarray(self.read_runs(idx), dtype=np.float32))
        metric = self.metric[torch.from_numpy(idx)]
        n_valid = valid_counts(params, metric)
        keep = n_valid >= 2
        return params[keep], metric[keep], n_valid[keep], idx[keep.numpy()]

    def fit_sample(self, runs: int = 512, seed: int = 0, max_bytes: int = 128 * 2**20) -> tuple[torch.Tensor, torch.Tensor]:
        """A fixed-seed sample of whole runs (identical on every rank) to fit the normalisation on: at
        most ``runs`` runs and about ``max_bytes`` of parameters (at least 16 runs)."""
        first = self.read_runs(np.arange(1))
        per_run = max(1, first.nbytes)
        runs = max(16, min(runs, max_bytes // per_run))
        idx = np.sort(np.random.default_rng(seed).choice(self.n_runs, size=min(runs, self.n_runs), replace=False))
        params, metric, _, _ = self.read_group(idx)
        return params, metric

    # --- the background thread ----------------------------------------------------------------
    def start(self) -> "StreamingPairs":
        if self.thread is None:
            self.thread = threading.Thread(target=self._work, name="gpt-pairs", daemon=True)
            self.thread.start()
        return self

    def _put(self, item) -> bool:
        while not self.stop.is_set():
            try:
                self.queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _work(self):
        try:
            per_run = max(1, self.read_runs(np.arange(1)).nbytes)
            self.group_runs = max(1, min(self.group_runs, self.group_bytes // per_run))
            self.spans = max(1, min(self.spans, self.group_runs))
            resident: list[tuple] = []  # the groups batches are drawn from, oldest first
            while not self.stop.is_set():
                group = self.read_group(self.choose_group())
                self.groups_read += 1
                self.runs_read += len(group[3])
                if len(group[3]) == 0:
                    continue
                resident = (resident + [group])[-self._distinct_groups():]
                if len(resident) < self._distinct_groups():
                    continue  # fill up before the first batch
                for _ in range(self.batches_per_group):
                    if not self._put(self._mixed_batch(resident)):
                        return
        except BaseException as e:  # surfaced in next()
            self._put(e)

    def _distinct_groups(self) -> int:
        """How many different groups there can be (1 when a group is the whole training set)."""
        return 1 if self.group_runs >= self.n_runs else self.mix

    def _mixed_batch(self, resident: list[tuple]) -> dict[str, torch.Tensor]:
        """``batch_size`` pairs, split as evenly as can be over the resident groups."""
        sizes = [self.batch_size // len(resident) + (k < self.batch_size % len(resident)) for k in range(len(resident))]
        parts = []
        for (params, metric, n_valid, idx), n in zip(resident, sizes):
            if n == 0:
                continue
            b = gather_pairs(self.problem, params, metric, n_valid, n, self.generator, self.pairing, self.init_frac, self.symmetry)
            b["run"] = torch.from_numpy(idx)[b["run"]]  # training-set positions
            parts.append(b)
        batch = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
        batch["group_runs"] = np.unique(np.concatenate([g[3] for g in resident]))
        return batch

    def next(self) -> dict[str, torch.Tensor]:
        self.start()
        while True:
            try:
                item = self.queue.get(timeout=1.0)
                break
            except queue.Empty:
                if self.thread is not None and not self.thread.is_alive():
                    raise RuntimeError("the pair-streaming thread stopped")
        if isinstance(item, BaseException):
            raise RuntimeError(f"reading training pairs failed: {item}") from item
        return item

    def close(self):
        self.stop.set()
        if self.thread is not None:
            self.thread.join(timeout=10)
            self.thread = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.stop.set()
        except Exception:
            pass
