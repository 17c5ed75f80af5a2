"""How G.pt on CartPole handles the policies' hidden-unit symmetry: random permutations (the paper's
augmentation), the stored order, or each start's canonical order (``CartPolePolicy.canonical_permutation``).

    .venv/bin/python bench/cartpole_symmetry.py retrieval --store S --sweep c1 --sweep c2 --sweep c3
    .venv/bin/python bench/cartpole_symmetry.py train --symmetry canonical --store S --sweep ... [--steps 3000]

``retrieval`` (no G.pt, about a minute): fresh random policies receive the update (final minus initial
checkpoint) of training runs that ended at a return of at least 475: of the run whose initial checkpoint
is nearest, of a random such run, and the mean update of the 8 nearest; once with every policy in its
stored unit order and once in canonical order. If updates line up across runs in an order, a
generative model of updates has something to learn in that order.

``train``: one tiny G.pt with the given ``symmetry`` and otherwise ``gptpipe train``'s defaults, trained
on the sweeps' training runs (held-out runs as ``gptpipe train`` picks them), then asked for a return
of 500 from 32 training runs' initial checkpoints and 32 fresh inits, one update each (DDIM-10 and the
8-draw posterior mean). Prints the mean returns before and after; appends one JSON line to
``bench/results/cartpole_symmetry.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gptpipe import problems  # noqa: E402
from gptpipe.evaluation import sampling as evaluation  # noqa: E402
from gptpipe.stages import train as train_stage  # noqa: E402
from gptpipe.gpt.trainer import TrainConfig, Trainer, load_model  # noqa: E402
from storage.store import open_store  # noqa: E402

CARTPOLE = problems.get("cartpole")
RESULTS = Path(__file__).resolve().parent / "results" / "cartpole_symmetry.jsonl"


def fresh_inits(n: int) -> torch.Tensor:
    return CARTPOLE.init([torch.Generator().manual_seed(777 + k) for k in range(n)])


def canonical(theta: torch.Tensor) -> torch.Tensor:
    return CARTPOLE.permute(theta, perm=CARTPOLE.canonical_permutation(theta))


def retrieval(params: np.ndarray, final_return: np.ndarray, n_fresh: int = 64) -> dict:
    good = torch.from_numpy(final_return >= 475)
    first, last = torch.from_numpy(params[:, 0])[good], torch.from_numpy(params[:, -1])[good]
    fresh = fresh_inits(n_fresh)
    out = {"good_runs": int(good.sum()), "start": float(CARTPOLE.score(fresh)["return"].mean())}
    for order in ("stored", "canonical"):
        if order == "canonical":
            perm = CARTPOLE.canonical_permutation(first)
            first, last = CARTPOLE.permute(first, perm=perm), CARTPOLE.permute(last, perm=perm)
            fresh = canonical(fresh)
        dist = torch.cdist(fresh, first)
        nearest = dist.topk(8, largest=False).indices
        update = last - first
        pick = torch.randint(0, len(first), (n_fresh,), generator=torch.Generator().manual_seed(1))
        score = lambda theta: float(CARTPOLE.score(theta)["return"].mean())
        out[order] = {"nearest_run": score(fresh + update[nearest[:, 0]]), "random_run": score(fresh + update[pick]),
                      "mean_of_8_nearest": score(fresh + update[nearest].mean(1))}
    return out


def one_step(model, diffusion, starts: torch.Tensor, sampler: str, steps: int) -> tuple[float, float, float]:
    before = CARTPOLE.score(starts)["return"]
    theta = evaluation.sample(model, diffusion, starts, before, torch.full((len(starts),), 500.0), sampler, steps,
                              torch.Generator().manual_seed(0))
    after = CARTPOLE.score(theta)["return"]
    return float(before.mean()), float(after.mean()), float((after >= 475).float().mean())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["retrieval", "train"])
    ap.add_argument("--store", required=True)
    ap.add_argument("--sweep", action="append", required=True)
    ap.add_argument("--symmetry", default="canonical", choices=["permute", "none", "canonical"])
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    data = train_stage.load_training_data(open_store(a.store), a.sweep, "return", budget=2**40)
    if a.what == "retrieval":
        print(json.dumps(retrieval(data.params, data.metric_values[:, -1]), indent=1))
        return
    t0 = time.perf_counter()
    trainer = Trainer(CARTPOLE, data.params, data.metric_values, TrainConfig(steps=a.steps, symmetry=a.symmetry))
    trainer.train()
    model, diffusion, _ = load_model(trainer.state_dict_bytes())
    row = {"symmetry": a.symmetry, "steps": a.steps, "training_runs": data.lineage["training_runs"],
           "final_loss": float(np.mean(trainer.losses[-100:])), "train_s": round(time.perf_counter() - t0, 1)}
    starts = {"training_inits": torch.from_numpy(data.params[:32, 0].copy()), "fresh_inits": fresh_inits(32)}
    for source, theta in starts.items():
        for sampler, steps in (("ddim", 10), ("mean", 8)):
            before, after, solved = one_step(model, diffusion, theta, sampler, steps)
            row[f"{source}_{sampler}"] = {"before": before, "after": after, "share_475": solved}
            print(f"{a.symmetry:9s} {source:14s} {sampler}-{steps:<3d} return {before:6.1f} -> {after:6.1f}  "
                  f"({solved:.0%} of policies at >= 475)", flush=True)
    RESULTS.parent.mkdir(exist_ok=True)
    with RESULTS.open("a") as f:
        f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
