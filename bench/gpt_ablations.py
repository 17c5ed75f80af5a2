"""G.pt ablations on digits_mlp: train one variant for a fixed wall-time budget, then prompt it.

    /work/main/.venv/bin/python bench/gpt_ablations.py --variant NAME [--minutes 6] [--threads 1]
    ... --store DIR --sweep NAME   # learn from a sweep collected with `gptpipe collect` (e.g. mnist_mlp)

Data: a 512-run digits_mlp sweep (25 epochs, 40 checkpoints, seed 0), cached under /tmp; the last 64
runs are held out. Evaluation: 32 held-out runs' initial checkpoints + 32 fresh random inits, each
prompted with 20 test-loss values evenly spaced from the best test loss of the training runs to
0.9 x its starting loss. Reports prompt-alignment R^2 (test loss) per sampler and the test error that
fresh inits reach when prompted with the best loss. One JSON line per run is appended to
bench/results/gpt_ablations.jsonl.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gptpipe import data, problems, sweep  # noqa: E402
from gptpipe.evaluation import sampling as evaluation  # noqa: E402
from gptpipe.gpt.trainer import Trainer, TrainConfig  # noqa: E402

# The paper's recipe at CPU scale; every other variant changes one thing relative to its parent.
BASE = dict(preset="tiny", batch_size=256, lr=1e-3, ema=0.999, pairing="uniform", normalization="global",
            t_high_frac=0.0, unit_tokens=False, model=dict(target="params", num_frequencies=128, max_freq_log2=14.0,
                                        conditioning="tokens", fuse_inputs=False, width=128, depth=4, heads=4))


def variant(parent: dict, model: dict | None = None, **train) -> dict:
    out = {**parent, **train}
    out["model"] = {**parent["model"], **(model or {})}
    return out


V: dict[str, dict] = {"paper": BASE}
V["init_pairs"] = variant(V["paper"], pairing="init")
V["mixed_pairs"] = variant(V["paper"], pairing="mixed")
V["layer_norm"] = variant(V["paper"], normalization="layer")
V["delta"] = variant(V["paper"], model=dict(target="delta"))
V["low_freq"] = variant(V["paper"], model=dict(num_frequencies=32, max_freq_log2=6.0))
V["adaln"] = variant(V["paper"], model=dict(conditioning="adaln"))
V["fused"] = variant(V["paper"], model=dict(fuse_inputs=True))
V["t_high"] = variant(V["paper"], t_high_frac=0.5)
V["depth2"] = variant(V["paper"], model=dict(depth=2))
V["batch1024"] = variant(V["paper"], batch_size=1024, lr=2e-3)
V["width256_bf16"] = variant(V["paper"], model=dict(width=256), autocast="bf16")
V["ema_0.99"] = variant(V["paper"], ema=0.99)
# All the levers that look right on paper at once; then leave-one-out from it.
V["combo"] = variant(V["paper"], pairing="mixed", normalization="layer", t_high_frac=0.5,
                     model=dict(target="delta", num_frequencies=32, max_freq_log2=6.0))
V["combo-uniform_pairs"] = variant(V["combo"], pairing="uniform")
V["combo-global_norm"] = variant(V["combo"], normalization="global")
V["combo-t_uniform"] = variant(V["combo"], t_high_frac=0.0)
V["combo-params_target"] = variant(V["combo"], model=dict(target="params"))
V["combo-high_freq"] = variant(V["combo"], model=dict(num_frequencies=128, max_freq_log2=14.0))
V["combo+init_pairs"] = variant(V["combo"], pairing="init")
V["combo+adaln"] = variant(V["combo"], model=dict(conditioning="adaln"))
V["combo+fused"] = variant(V["combo"], model=dict(fuse_inputs=True))
V["combo+depth2"] = variant(V["combo"], model=dict(depth=2))
# Throughput: 4 tokens instead of 12 (x_t and start chunks fused, scalars via adaLN), 2 blocks.
V["fast"] = variant(V["combo"], model=dict(fuse_inputs=True, conditioning="adaln", depth=2))
# One token per hidden unit, all sharing one encoder/decoder: exactly permutation-equivariant.
V["units"] = variant(V["fast"], unit_tokens=True)
V["units+b128"] = variant(V["units"], batch_size=128)
V["units+lr3e-3"] = variant(V["units"], lr=3e-3)
V["units+t_high1"] = variant(V["units"], t_high_frac=1.0)
V["best"] = variant(V["units"], batch_size=128, lr=3e-3)
V["best+t_high1"] = variant(V["best"], t_high_frac=1.0)
# Capacity: the fused unit token carries 2 x 75 numbers through a 128-wide stream.
V["best+w256"] = variant(V["best"], model=dict(width=256))
V["best+d4"] = variant(V["best"], model=dict(depth=4))
V["best+d6"] = variant(V["best"], model=dict(depth=6))
V["best+d8"] = variant(V["best"], model=dict(depth=8))
V["best+d6+bf16"] = variant(V["best+d6"], autocast="bf16")
V["best+d8+bf16"] = variant(V["best+d8"], autocast="bf16")
V["tiny+lr1.5e-3"] = variant(V["best+d8+bf16"], lr=1.5e-3)
V["tiny+lr6e-3"] = variant(V["best+d8+bf16"], lr=6e-3)
V["best+init0.8"] = variant(V["best"], init_frac=0.8)
V["tiny+d12"] = variant(V["best+d8+bf16"], model=dict(depth=12))


def get_data(runs: int, cache: str = "/tmp/gptpipe-bench") -> dict[str, np.ndarray]:
    path = Path(cache) / f"digits_mlp_{runs}.npz"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        cfg = sweep.SweepConfig(problem="digits_mlp", runs=runs, epochs=25, checkpoints=40)
        res = sweep.train_runs(cfg, range(runs), data.load("digits"))
        np.savez(path, params=res.params, n_ckpts=np.array(res.n_ckpts), **res.metrics)
    z = np.load(path)
    return {k: z[k] for k in z.files}


def store_data(url: str, sweep_name: str):
    """Training and held-out runs of a sweep in a store, split as ``gptpipe train`` splits them."""
    from gptpipe.stages import train as train_stage
    from storage import sweeps as sweeps_mod
    from storage.store import open_store

    st = open_store(url)
    d = train_stage.load_training_data(st, [sweep_name], None, 0, budget=2**40)
    problem = problems.get(d.problem)
    held_runs = d.lineage["heldout_runs"][sweep_name]
    held_params = sweeps_mod.read_blocks(st, sweep_name, held_runs)
    ds = problem.load_data(sweeps_mod.read_config(st, sweep_name)["recipe"]["data"])
    flat = torch.as_tensor(held_params.reshape(-1, problem.n_params))
    held_metric = problem.score(flat, ds)[d.metric].numpy().reshape(held_params.shape[:2])
    return problem, ds, d.params, d.metric_values, held_params, held_metric


def evaluate(model, diffusion, problem, ds, starts: dict[str, torch.Tensor], best: float, samplers, n_prompts=20, seed=0):
    out = {}
    for name, (sampler, steps) in samplers.items():
        row = {}
        for source, theta in starts.items():
            g = torch.Generator().manual_seed(seed)
            r = evaluation.prompt_networks(model, diffusion, problem, ds, theta, best, n_prompts, "test_loss", sampler, steps, g)
            row[source] = {
                "r2": r.r2,
                "pearson": r.pearson,
                "best_prompt_error": float(np.mean(r.achieved["test_error"][:, 0])),
                "best_prompt_loss": float(np.mean(r.achieved["test_loss"][:, 0])),
                "min_error": float(np.min(r.achieved["test_error"])),
            }
        row["r2"] = float(np.mean([row[s]["r2"] for s in starts]))
        out[name] = row
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--variant", required=True, choices=sorted(V))
    ap.add_argument("--minutes", type=float, default=6.0)
    ap.add_argument("--steps", type=int, default=0, help="fixed step count instead of a time budget")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--runs", type=int, default=512)
    ap.add_argument("--heldout", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--store", help="learn from a sweep in this store instead (e.g. mnist_mlp); with --sweep")
    ap.add_argument("--sweep", help="the sweep in --store; its recorded held-out runs are the held-out set")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "gpt_ablations.jsonl"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    if args.store:
        problem, ds, params, metric, held_params, held_metric = store_data(args.store, args.sweep)
    else:
        problem, ds = problems.get("digits_mlp"), data.load("digits")
        d = get_data(args.runs)
        ok = np.isfinite(d["test_loss"]).all(1)
        train_idx = np.flatnonzero(ok[: args.runs - args.heldout])
        held_idx = np.flatnonzero(ok[args.runs - args.heldout :]) + args.runs - args.heldout
        params, metric = d["params"][train_idx], d["test_loss"][train_idx]
        held_params, held_metric = d["params"][held_idx], d["test_loss"][held_idx]
    best = float(np.nanmin(metric))

    spec = V[args.variant]
    cfg = TrainConfig(**{**spec, "model": dict(spec["model"]), "seed": args.seed, "steps": max(args.steps, 10)})
    trainer = Trainer(problem, params, metric, cfg)
    if not args.steps:  # size the schedule to the time budget from a short speed probe
        t0 = time.perf_counter()
        trainer.step_many(10)
        per_step = (time.perf_counter() - t0) / 10
        probe = Trainer(problem, params, metric, cfg)  # restart from scratch with the measured length
        cfg.steps = max(50, int(args.minutes * 60 / per_step))
        trainer = probe
        trainer.config.steps = cfg.steps
    t0 = time.perf_counter()
    deadline = t0 + args.minutes * 60 * 1.1 if not args.steps else float("inf")
    while trainer.step < cfg.steps and time.perf_counter() < deadline:
        trainer.step_many(min(100, cfg.steps - trainer.step))
        print(f"step {trainer.step}/{cfg.steps} loss {np.mean(trainer.losses[-100:]):.4f} {time.perf_counter() - t0:.0f}s", flush=True)
    train_s = time.perf_counter() - t0

    val = trainer.validation_loss(held_params, held_metric)
    g = torch.Generator().manual_seed(10_000 + args.seed)
    fresh = problem.init([torch.Generator().manual_seed(int(s)) for s in torch.randint(0, 2**31, (32,), generator=g)])
    starts = {"heldout_run": torch.as_tensor(held_params[:32, 0]), "fresh_init": fresh}
    samplers = {"ddim1": ("ddim", 1), "ddim10": ("ddim", 10), "mean8": ("mean", 8)}
    t1 = time.perf_counter()
    results = {"ema": evaluate(*trainer.sampler_model(True)[:2], problem, ds, starts, best, samplers)}
    results["raw"] = evaluate(*trainer.sampler_model(False)[:2], problem, ds, starts, best, {"ddim1": ("ddim", 1)})
    eval_s = time.perf_counter() - t1
    row = {
        "variant": args.variant, "seed": args.seed, "threads": args.threads,
        "runs": len(params) + len(held_params) if args.store else args.runs,
        "problem": problem.name, "sweep": args.sweep,
        "steps": trainer.step, "train_min": round(train_s / 60, 2), "eval_s": round(eval_s, 1),
        "final_loss": float(np.mean(trainer.losses[-100:])), "val_loss": val, "best_seen": best,
        "config": cfg.to_dict(), "results": results,
        "command": f"/work/main/.venv/bin/python bench/gpt_ablations.py --variant {args.variant} --minutes {args.minutes:g} --threads {args.threads}"
                   + (f" --steps {args.steps}" if args.steps else "") + (f" --runs {args.runs}" if args.runs != 512 else "")
                   + (f" --store {args.store} --sweep {args.sweep}" if args.store else ""),
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "a") as f:
        f.write(json.dumps(row) + "\n")
    e = results["ema"]
    print(json.dumps({"variant": args.variant, "steps": trainer.step, "train_min": row["train_min"], "val_loss": round(val, 4),
                      **{f"r2_{k}": round(v["r2"], 3) for k, v in e.items()},
                      "r2_raw_ddim1": round(results["raw"]["ddim1"]["r2"], 3),
                      **{f"err_fresh_best_{k}": round(v["fresh_init"]["best_prompt_error"], 3) for k, v in e.items()},
                      }))


if __name__ == "__main__":
    main()
