"""G.pt benchmarks (never run by the tests). Every ratio is against a baseline measured in the same run.

    .venv/bin/python bench/gpt.py precision   # training steps/s, fp32 vs bf16 autocast, tiny and small presets
    .venv/bin/python bench/gpt.py attention   # training steps/s, written-out attention vs F.scaled_dot_product_attention
    .venv/bin/python bench/gpt.py denoising --store S --model M   # a stored model's loss per noise level
    .venv/bin/python bench/gpt.py loader      # pair loader samples/s (streamed from a store, and in memory) vs training's consumption
    .venv/bin/python bench/gpt.py sampler     # evaluation cost per (network, prompt) and R²: batched DDIM-10 / DDIM-1 vs 1,000-step DDPM
    .venv/bin/python bench/gpt.py --threads 2 compile   # training steps/s, eager vs torch.compile (and the time compiling takes)

Data: the 2,048-run digits_mlp sweep of bench/gpt_ablations.py (25 epochs, 40 checkpoints, seed 0; cached
under /tmp/gptpipe-bench), runs 0-1,983 for training, 1,984-2,047 held out. ``--threads`` (default 1)
sets torch's intra-op threads. Results are printed as a markdown table and appended as JSON lines to
bench/results.jsonl.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from gpt_ablations import get_data  # noqa: E402

from gptpipe import data, problems  # noqa: E402
from gptpipe.evaluation import sampling as evaluation  # noqa: E402
from gptpipe.gpt.pairs import StreamingPairs, gather_pairs, valid_counts  # noqa: E402
from gptpipe.gpt.trainer import TrainConfig, Trainer, load_model, use_bf16  # noqa: E402

RESULTS = REPO / "bench" / "results.jsonl"
RUNS, HELDOUT = 2048, 64


def record(name: str, **values) -> dict:
    row = {"bench": name, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "machine": f"{platform.machine()} {os.cpu_count()} cores",
           "torch": torch.__version__, **values}
    with open(RESULTS, "a") as f:
        f.write(json.dumps(row) + "\n")
    return row


def table(rows: list[dict], columns: list[str]) -> None:
    print("\n| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for r in rows:
        print("| " + " | ".join(f"{r.get(c):.4g}" if isinstance(r.get(c), float) else str(r.get(c, "")) for c in columns) + " |")
    print()


def training_set():
    d = get_data(RUNS)
    ok = np.isfinite(d["test_loss"]).all(1)
    train_idx = np.flatnonzero(ok[: RUNS - HELDOUT])
    held_idx = np.flatnonzero(ok[RUNS - HELDOUT:]) + RUNS - HELDOUT
    return d, train_idx, held_idx


def steps_per_s(trainer: Trainer, steps: int) -> float:
    t = time.perf_counter()
    trainer.step_many(steps)
    return steps / (time.perf_counter() - t)


# ------------------------------------------------------------------------------------------------
# (a) fp32 vs bf16 autocast
# ------------------------------------------------------------------------------------------------


def bench_precision(args) -> None:
    problem = problems.get("digits_mlp")
    d, train_idx, _ = training_set()
    params, metric = d["params"][train_idx], d["test_loss"][train_idx]
    rows = []
    for preset, steps in (("tiny", args.steps_tiny), ("small", args.steps_small)):
        trainers = {mode: Trainer(problem, params, metric, TrainConfig(preset=preset, autocast=mode, device="cpu"))
                    for mode in ("none", "bf16")}
        for tr in trainers.values():
            tr.step_many(3)  # warm-up
        # alternate the two, so load from other processes hits both alike; best of the rounds
        rates = {m: [] for m in trainers}
        for _ in range(args.rounds):
            for m, tr in trainers.items():
                rates[m].append(steps_per_s(tr, steps))
        fp32, bf16 = max(rates["none"]), max(rates["bf16"])
        tr = trainers["none"]
        rows.append(record("gpt_precision", preset=preset, width=tr.gpt_config.width, depth=tr.gpt_config.depth,
                           tokens=tr.model.n_param_tokens, batch=tr.config.batch_size, threads=args.threads,
                           fp32_steps_per_s=round(fp32, 2), bf16_steps_per_s=round(bf16, 2), bf16_speedup=round(bf16 / fp32, 2),
                           auto_choice="bf16" if use_bf16(TrainConfig(preset=preset), tr.gpt_config, tr.device) else "fp32",
                           model_params=sum(p.numel() for p in tr.model.parameters())))
    table(rows, ["preset", "width", "depth", "tokens", "batch", "model_params", "fp32_steps_per_s", "bf16_steps_per_s", "bf16_speedup"])


# ------------------------------------------------------------------------------------------------
# (a') eager vs torch.compile
# ------------------------------------------------------------------------------------------------


def bench_compile(args) -> None:
    """The demos' G.pt settings on synthetic checkpoints of each problem's shape (speed does not depend
    on the values): the same seed eager and compiled, alternated, best of the rounds; the losses of the
    first steps side by side show what compiling changes in the numbers."""
    rows = []
    for name in args.problems:
        problem = problems.get(name)
        g = torch.Generator().manual_seed(0)
        params = torch.randn(256, 20, problem.n_params, generator=g) * 0.1
        metric = torch.rand(256, 20, generator=g)
        trainers, losses, compile_s = {}, {}, 0.0
        for compiled in (False, True):
            tr = Trainer(problem, params, metric, TrainConfig(preset="tiny", steps=10_000, device="cpu", compile=compiled))
            t = time.perf_counter()
            losses[compiled] = tr.step_many(args.check_steps)  # the compiled one compiles here
            if compiled:
                compile_s = time.perf_counter() - t
            trainers[compiled] = tr
        rates = {m: [] for m in trainers}
        for _ in range(args.rounds):
            for m, tr in trainers.items():
                rates[m].append(steps_per_s(tr, args.steps))
        eager, comp = max(rates[False]), max(rates[True])
        diff = max(abs(a - b) / max(abs(a), 1e-9) for a, b in zip(losses[False], losses[True]))
        rows.append(record("gpt_compile", problem=name, threads=args.threads, batch=trainers[False].config.batch_size,
                           tokens=trainers[False].model.n_param_tokens, eager_steps_per_s=round(eager, 2),
                           compiled_steps_per_s=round(comp, 2), speedup=round(comp / eager, 2), compile_s=round(compile_s, 1),
                           first_losses_max_rel_diff=float(f"{diff:.2g}"),
                           break_even_steps=round(compile_s / max(1e-9, 1 / eager - 1 / comp))))
    table(rows, ["problem", "threads", "batch", "tokens", "eager_steps_per_s", "compiled_steps_per_s", "speedup", "compile_s",
                 "break_even_steps", "first_losses_max_rel_diff"])


def sdpa_attention(self, x: torch.Tensor) -> torch.Tensor:
    """``Block.attention`` through PyTorch's fused kernel (the library alternative to the written-out form)."""
    B, T, D = x.shape
    q, k, v = self.qkv(x).view(B, T, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
    y = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    return self.proj(y.transpose(1, 2).reshape(B, T, D))


def bench_attention(args) -> None:
    from gptpipe.gpt.model import Block

    problem = problems.get("digits_mlp")
    d, train_idx, _ = training_set()
    params, metric = d["params"][train_idx], d["test_loss"][train_idx]
    written_out = Block.attention
    rows = []
    for preset, steps in (("tiny", args.steps_tiny), ("small", args.steps_small)):
        tr = Trainer(problem, params, metric, TrainConfig(preset=preset, device="cpu"))
        tr.step_many(3)  # warm-up
        rates = {"written_out": [], "sdpa": []}
        try:
            for _ in range(args.rounds):  # alternate, so load from other processes hits both alike
                for name, fn in (("written_out", written_out), ("sdpa", sdpa_attention)):
                    Block.attention = fn
                    rates[name].append(steps_per_s(tr, steps))
        finally:
            Block.attention = written_out
        ours, sdpa = max(rates["written_out"]), max(rates["sdpa"])
        rows.append(record("gpt_attention", preset=preset, width=tr.gpt_config.width, depth=tr.gpt_config.depth,
                           tokens=tr.model.n_param_tokens, batch=tr.config.batch_size, threads=args.threads, bf16=tr.bf16,
                           written_out_steps_per_s=round(ours, 2), sdpa_steps_per_s=round(sdpa, 2),
                           speedup=round(ours / sdpa, 2)))
    table(rows, ["preset", "width", "depth", "tokens", "bf16", "written_out_steps_per_s", "sdpa_steps_per_s", "speedup"])


def bench_denoising(args) -> None:
    """Diffusion loss of a stored model per timestep range, on 1,024 of its training pairs (EMA weights):
    low t shows whether the model can pass its input through at all, high t how much of the update it
    predicts from the start parameters and the two metrics (``x0_variance`` = predicting no update)."""
    from gptpipe.stages import train as train_stage
    from storage import models
    from storage.store import open_store

    store = open_store(args.store)
    lineage = models.read_lineage(store, args.model)
    data = train_stage.load_training_data(store, lineage["sweeps"], lineage["metric"], seed=lineage["train_config"]["seed"])
    tr = Trainer.from_bytes(data.problem, data.params, data.metric_values, models.read_state(store, args.model))
    g = torch.Generator().manual_seed(5)
    b = tr.batch(1024, g)
    x0 = tr.normalizer.x0(tr.normalizer.normalize(b["theta_j"]), tr.normalizer.normalize(b["theta_i"]))
    row = {"model": args.model, "sweeps": ",".join(lineage["sweeps"]), "x0_variance": round(float(x0.pow(2).mean()), 3)}
    for lo, hi in ((0, 10), (10, 100), (100, 300), (300, 600), (600, 900), (900, 1000)):
        b["t"] = torch.randint(lo, hi, (len(x0),), generator=g)
        with torch.no_grad():
            row[f"t{lo}-{hi}"] = round(float(tr.loss_on(tr.ema.eval(), b)), 3)
    record("gpt_denoising", **row)
    table([row], list(row))


# ------------------------------------------------------------------------------------------------
# (b) loader throughput vs training consumption
# ------------------------------------------------------------------------------------------------


def write_store(params: np.ndarray, root: str):
    """The training runs as a sweep's parameter array (one chunk per run) in a local store."""
    from storage import params as params_store
    from storage import sweeps
    from storage.store import open_store

    store = open_store(root, create=True)
    arr = params_store.create_params(store, sweeps.params_path("bench"), *params.shape)
    for r in range(0, len(params), 256):
        arr[r : r + 256] = params[r : r + 256]
    return store


def bench_loader(args) -> None:
    from storage import sweeps

    problem = problems.get("digits_mlp")
    d, train_idx, _ = training_set()
    params, metric = d["params"][train_idx].astype(np.float32), d["test_loss"][train_idx]
    cfg = TrainConfig(preset="tiny", device="cpu")
    tmp = tempfile.mkdtemp(prefix="gptpipe-bench-loader-")
    store = write_store(params, tmp)
    read = lambda idx: sweeps.read_blocks(store, "bench", idx)
    B = cfg.batch_size

    # the model's consumption: training samples/s (in-memory pairs)
    tr = Trainer(problem, params, metric, cfg)
    tr.step_many(3)
    train_sps = steps_per_s(tr, args.train_steps) * B

    # the loader alone, streamed from the store through its background thread
    def stream_rate(**opts) -> tuple[float, float]:
        s = StreamingPairs(problem, read, metric, B, cfg.pairing, cfg.init_frac, cfg.symmetry, seed=1, **opts)
        with s:
            s.next()
            t = time.perf_counter()
            for _ in range(args.batches):
                s.next()
            rate = args.batches * B / (time.perf_counter() - t)
        return rate, s.runs_read / max(1, s.groups_read)

    stream_sps, group = stream_rate(group_runs=args.group_runs, batches_per_group=args.batches_per_group)
    # the in-memory path's pair gathering (done on the training thread)
    p_t, m_t = torch.from_numpy(params), torch.as_tensor(metric, dtype=torch.float32)
    nv, g = valid_counts(p_t, m_t), torch.Generator().manual_seed(0)
    t = time.perf_counter()
    for _ in range(args.batches):
        gather_pairs(problem, p_t, m_t, nv, B, g, cfg.pairing, cfg.init_frac, cfg.symmetry)
    memory_sps = args.batches * B / (time.perf_counter() - t)
    # end to end: training steps/s fed by the stream vs in memory (a stalled loader would show here)
    s = StreamingPairs(problem, read, metric, B, cfg.pairing, cfg.init_frac, cfg.symmetry, seed=2,
                       group_runs=args.group_runs, batches_per_group=args.batches_per_group)
    tr_s = Trainer(problem, None, metric, cfg, stream=s)
    tr_s.step_many(3)
    rates = {"memory": [], "stream": []}
    for _ in range(2):
        rates["memory"].append(steps_per_s(tr, args.train_steps) * B)
        rates["stream"].append(steps_per_s(tr_s, args.train_steps) * B)
    tr_s.close()
    train_sps = max([train_sps] + rates["memory"])
    row = record("gpt_loader", preset="tiny", batch=B, threads=args.threads, training_runs=len(params),
                 group_runs=round(group, 1), batches_per_group=args.batches_per_group,
                 train_samples_per_s=round(train_sps), stream_samples_per_s=round(stream_sps),
                 memory_gather_samples_per_s=round(memory_sps),
                 stream_over_training=round(stream_sps / train_sps, 1), memory_over_training=round(memory_sps / train_sps, 1),
                 train_fed_by_stream_samples_per_s=round(max(rates["stream"])),
                 stream_fed_over_memory_fed=round(max(rates["stream"]) / max(rates["memory"]), 2))
    table([row], ["training_runs", "batch", "train_samples_per_s", "stream_samples_per_s", "stream_over_training",
                  "memory_gather_samples_per_s", "memory_over_training", "train_fed_by_stream_samples_per_s", "stream_fed_over_memory_fed"])
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)


# ------------------------------------------------------------------------------------------------
# (c) evaluation cost and R²: batched few-step samplers vs 1,000-step DDPM one network at a time
# ------------------------------------------------------------------------------------------------


def trained_model(args, params, metric) -> bytes:
    path = Path("/tmp/gptpipe-bench") / f"sampler_model_{RUNS}_{args.train_steps}.safetensors"
    if not path.exists():
        problem = problems.get("digits_mlp")
        tr = Trainer(problem, params, metric, TrainConfig(preset="tiny", steps=args.train_steps, device="cpu"))
        t = time.perf_counter()
        tr.train(on_progress=lambda s, l: print(f"  train step {s}: loss {l:.4f} ({time.perf_counter() - t:.0f} s)", flush=True))
        path.write_bytes(tr.state_dict_bytes())
    return path.read_bytes()


def bench_sampler(args) -> None:
    problem = problems.get("digits_mlp")
    ds = data.load("digits")
    d, train_idx, held_idx = training_set()
    params, metric = d["params"][train_idx], d["test_loss"][train_idx]
    best = float(np.nanmin(metric))
    model, diffusion, _ = load_model(trained_model(args, params, metric))
    n_half = args.networks // 2
    g = torch.Generator().manual_seed(10_000)
    fresh = problem.init([torch.Generator().manual_seed(int(s)) for s in torch.randint(0, 2**31, (n_half,), generator=g)])
    # the first networks of each source are the ones the 1,000-step sampler also runs on
    k = args.ddpm_networks // 2
    starts = torch.cat([torch.as_tensor(d["params"][held_idx[:n_half], 0]), fresh])
    order = list(range(k)) + list(range(n_half, n_half + k)) + list(range(k, n_half)) + list(range(n_half + k, 2 * n_half))
    starts = starts[order]  # the DDPM subset first
    N, P = len(starts), args.prompts
    start_metric = problem.score(starts, ds)["test_loss"].float()
    requested = evaluation.prompts(best, start_metric, P)  # [N, P]
    rep = lambda x: x.repeat_interleave(P, dim=0)

    def achieved(theta):
        return problem.score(theta, ds)["test_loss"].double().numpy().reshape(-1, P)

    rows = []
    results = {}
    for name, sampler, steps in (("ddim10", "ddim", 10), ("ddim1", "ddim", 1)):
        gen = torch.Generator().manual_seed(0)
        evaluation.sample(model, diffusion, rep(starts[:2]), rep(start_metric[:2]), requested[:2].reshape(-1), sampler, steps, gen)  # warm-up
        t = time.perf_counter()
        theta = evaluation.sample(model, diffusion, rep(starts), rep(start_metric), requested.reshape(-1), sampler, steps, gen)
        per_pair = (time.perf_counter() - t) / (N * P)
        results[name] = (per_pair, achieved(theta))
    # the paper's sampler: 1,000 ancestral steps, one network (its P prompts as one batch) at a time
    gen = torch.Generator().manual_seed(0)
    ddpm, t = [], time.perf_counter()
    for n in range(2 * k):
        ddpm.append(evaluation.sample(model, diffusion, rep(starts[n : n + 1]), rep(start_metric[n : n + 1]), requested[n],
                                      "ddpm", 1000, gen))
    per_pair_ddpm = (time.perf_counter() - t) / (2 * k * P)
    ach_ddpm = achieved(torch.cat(ddpm))
    sub = slice(0, 2 * k)
    req = requested.double().numpy()
    r2_ddpm = evaluation.prompt_alignment_r2(req[sub], ach_ddpm)
    for name, (per_pair, ach) in results.items():
        rows.append(record("gpt_sampler", sampler=name, networks=N, prompts=P, threads=args.threads, model_steps=args.train_steps,
                           s_per_pair=per_pair, r2_all=round(evaluation.prompt_alignment_r2(req, ach), 3),
                           r2_on_ddpm_networks=round(evaluation.prompt_alignment_r2(req[sub], ach[sub]), 3),
                           speedup_vs_ddpm1000=round(per_pair_ddpm / per_pair, 1)))
    rows.append(record("gpt_sampler", sampler="ddpm1000 (one network at a time)", networks=2 * k, prompts=P, threads=args.threads,
                       model_steps=args.train_steps, s_per_pair=per_pair_ddpm, r2_all=None, r2_on_ddpm_networks=round(r2_ddpm, 3),
                       speedup_vs_ddpm1000=1.0,
                       note=f"run on {2 * k} of the {N} networks ({k} held-out-run inits, {k} fresh inits); per-pair cost = "
                            f"wall / ({2 * k} x {P}) pairs"))
    table(rows, ["sampler", "networks", "prompts", "s_per_pair", "speedup_vs_ddpm1000", "r2_on_ddpm_networks", "r2_all"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1)
    sub = p.add_subparsers(dest="what", required=True)
    a = sub.add_parser("precision")
    a.add_argument("--steps-tiny", type=int, default=20)
    a.add_argument("--steps-small", type=int, default=5)
    a.add_argument("--rounds", type=int, default=3)
    at = sub.add_parser("attention")
    at.add_argument("--steps-tiny", type=int, default=20)
    at.add_argument("--steps-small", type=int, default=5)
    at.add_argument("--rounds", type=int, default=4)
    cp = sub.add_parser("compile")
    cp.add_argument("--problems", nargs="+", default=["digits_mlp", "mnist_mlp"])
    cp.add_argument("--steps", type=int, default=30)
    cp.add_argument("--check-steps", type=int, default=5)
    cp.add_argument("--rounds", type=int, default=3)
    dn = sub.add_parser("denoising")
    dn.add_argument("--store", required=True)
    dn.add_argument("--model", required=True)
    b = sub.add_parser("loader")
    b.add_argument("--batches", type=int, default=200)
    b.add_argument("--train-steps", type=int, default=20)
    b.add_argument("--group-runs", type=int, default=512)
    b.add_argument("--batches-per-group", type=int, default=64)
    c = sub.add_parser("sampler")
    c.add_argument("--train-steps", type=int, default=1400)
    c.add_argument("--networks", type=int, default=64)
    c.add_argument("--prompts", type=int, default=20)
    c.add_argument("--ddpm-networks", type=int, default=4)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    {"precision": bench_precision, "attention": bench_attention, "denoising": bench_denoising, "loader": bench_loader, "sampler": bench_sampler,
     "compile": bench_compile}[args.what](args)


if __name__ == "__main__":
    main()
