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
(c) DDIM-10 sampling throughput on the device against the CPU, with the ``tiny`` preset.

Synthetic data: runs whose checkpoints move from a random init towards a random end point while their
"loss" falls, the shape of a real sweep without collecting one (the GPU machine may lack the data).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gptpipe import problems  # noqa: E402
from gptpipe.evaluation.sampling import sample  # noqa: E402
from gptpipe.gpt.pairs import StreamingPairs  # noqa: E402
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


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto", help="auto (CUDA when present), cuda, cpu")
    ap.add_argument("--reduced", action="store_true", help="CPU-sized checks (what the tests run)")
    ap.add_argument("--out", help="also write the JSON here")
    ap.add_argument("--compile", action="store_true", help="also measure training under torch.compile (minutes of compiling)")
    args = ap.parse_args(argv)
    device = resolve_device(args.device)
    t = time.perf_counter()
    result = {"device": describe_device(device), "torch": torch.__version__, "cuda": torch.version.cuda, "reduced": args.reduced,
              "correctness": correctness(device, args.reduced), "training": throughput(device, args.reduced, args.compile),
              "sampling": sampling_throughput(device, args.reduced)}
    result["wall_s"] = round(time.perf_counter() - t, 1)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return result


if __name__ == "__main__":
    main()
