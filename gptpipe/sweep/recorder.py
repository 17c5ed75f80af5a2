"""The checkpoints of K runs trained together: which runs are still alive, and what each kept.

Both batched trainers (``sgd``, ``ppo``) use one recorder: at every checkpoint step a run whose weights
are non-finite or larger than ``DIVERGED_ABS`` (or whose score is non-finite) is marked diverged, stops
moving (its learning rate is multiplied by ``alive``) and keeps the checkpoints it had.
"""

from __future__ import annotations

import numpy as np
import torch

from gptpipe.sweep.config import RunsResult

DIVERGED_ABS = 1e4  # a weight this large means the run exploded


class CheckpointRecorder:
    """Parameters ``[K, C, P]`` and metrics ``[K, C]`` of K runs at the checkpoint ``steps``; NaN after
    a run diverged."""

    def __init__(self, steps: np.ndarray, K: int, P: int, metrics: tuple[str, ...]):
        self.steps = steps
        self.params = np.full((K, len(steps), P), np.nan, dtype=np.float32)
        self.metrics = {m: np.full((K, len(steps)), np.nan, dtype=np.float64) for m in metrics}
        self.n_ckpts = [len(steps)] * K  # valid checkpoints per run
        self.alive = torch.ones(K, 1)  # 0 once a run has diverged: it stops moving
        self.taken = 0  # checkpoints taken so far

    def due(self, step: int) -> bool:
        """Is a checkpoint taken after ``step`` optimiser steps (0 = the init)?"""
        return self.taken < len(self.steps) and step == self.steps[self.taken]

    @property
    def dead(self) -> torch.Tensor:
        return self.alive[:, 0] == 0

    @torch.no_grad()
    def mark_diverged(self, weights: torch.Tensor, scores_ok: torch.Tensor | None = None) -> torch.Tensor:
        """Mark runs whose ``weights [K, *]`` (or ``scores_ok`` False) show divergence since the last
        checkpoint; returns the mask ``[K]`` of runs still alive."""
        ok = torch.isfinite(weights).all(1) & (weights.abs().amax(1) < DIVERGED_ABS) & ~self.dead
        if scores_ok is not None:
            ok &= scores_ok
        for k in np.flatnonzero((~ok & ~self.dead).numpy()):
            self.n_ckpts[k] = self.taken
            self.alive[k, 0] = 0.0
        return ~self.dead

    def store(self, theta: torch.Tensor, scores: dict[str, torch.Tensor]) -> None:
        """Keep the live runs' ``theta`` and ``scores`` (one value per live run) as the next checkpoint."""
        keep = (~self.dead).numpy()
        self.params[keep, self.taken] = theta.detach()[~self.dead].numpy()
        for m, v in scores.items():
            self.metrics[m][keep, self.taken] = v.double().numpy()
        self.taken += 1

    def result(self, epochs: np.ndarray, seeds: list[int], lrs: list[float], wall_s: float, extra: dict | None = None) -> RunsResult:
        assert self.taken == len(self.steps), (self.taken, len(self.steps))
        return RunsResult(params=self.params, metrics=self.metrics, steps=self.steps, epochs=epochs, seeds=seeds, lrs=lrs,
                          n_ckpts=self.n_ckpts, wall_s=wall_s, extra=extra or {})
