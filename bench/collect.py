"""Collection benchmarks (never run by the tests). Every ratio is against a baseline measured in the
same run, on the same machine.

    .venv/bin/python bench/collect.py trainer      # batched trainer vs per-network nn.Module + SGD, share of fp32 peak;
                                                   # per-run vs shared data order
    .venv/bin/python bench/collect.py roofline     # fp32 GEMM peak and memory bandwidth measured here, FLOPs and bytes
                                                   # per network-epoch (step, scoring), the bound, the trainer against it
    .venv/bin/python bench/collect.py command --data-order per_run shared --server cold warm
                                                   # the whole `gptpipe collect` (start-up and writes included) in
                                                   # each data order, starting or finding the local Prefect server,
                                                   # vs the per-network loop, in turn, medians
    .venv/bin/python bench/collect.py overhead     # wall time of a 1,000-run `gptpipe collect` / summed task compute,
                                                   # and the fixed cost, with the local Prefect server cold and warm
    .venv/bin/python bench/collect.py scale --runs 1000 10000 100000   # cost growth of digits_mlp sweeps
    .venv/bin/python bench/collect.py ppo --k 16 32 64 128   # CartPole's batched PPO: seconds per run by shard size

Results are printed as a markdown table and appended as JSON lines to bench/results.jsonl.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from gptpipe import data, problems, sweep  # noqa: E402
from gptpipe.sweep import config as sweep_config

RESULTS = REPO / "bench" / "results.jsonl"


def record(name: str, **values) -> None:
    row = {"bench": name, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "machine": f"{platform.machine()} {os.cpu_count()} cores", **values}
    with open(RESULTS, "a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps(row, indent=1))


def matmul_peak_gflops(n: int = 2048, repeats: int = 10) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    t = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * n**3 * repeats / (time.perf_counter() - t) / 1e9


def flops_per_network_epoch(problem, config: sweep.SweepConfig, n_train: int, n_test: int) -> float:
    """Matmul FLOPs of one network-epoch: training (forward, weight gradients, hidden-layer input
    gradient) and the checkpoint evaluations on both splits, spread over the epochs."""
    d, h, c = problem.d_in, problem.hidden, problem.classes
    train = n_train * (2 * d * h * 2 + 2 * h * c * 3)
    evals = (n_train + n_test) * 2 * (d * h + h * c) * config.checkpoints / config.epochs
    return train + evals


def memory_bandwidth_gbs(n: int = 64 * 2**20, repeats: int = 5) -> dict:
    """STREAM-style copy (a = b: 8 bytes per element) and triad (a = b + s c: 12) in GB/s, fp32."""
    a, b, c = torch.empty(n), torch.rand(n), torch.rand(n)
    out = {}
    for name, kernel, moved in (("copy", lambda: a.copy_(b), 8), ("triad", lambda: torch.add(b, c, alpha=3.0, out=a), 12)):
        kernel()
        t = time.perf_counter()
        for _ in range(repeats):
            kernel()
        out[name] = moved * n * repeats / (time.perf_counter() - t) / 1e9
    return out


def roofline_model(problem, config: sweep.SweepConfig, n_train: int, n_test: int, k: int) -> dict:
    """FLOPs and bytes moved per network-epoch, for the training step and for checkpoint scoring, as the
    batched trainer does them (fp32). Step, per run: its mini-batch is gathered from the data (read the
    pixels, write the batch, then the first layer's matmul and its weight gradient's each read it: 4
    passes; one for all K runs when the data order is shared), and every step reads and writes the
    weights, their gradient and the momentum (~7 passes over the parameters). Scoring: the K networks
    score the same evaluation data, so one pass over the pixels serves K networks; the hidden
    activations are written and read once per network."""
    d, h, c = problem.d_in, problem.hidden, problem.classes
    n_params = d * h + h + h * c + c
    steps = math.ceil(n_train / config.batch_size)
    per_ckpt = config.checkpoints / config.epochs
    flops_step = n_train * (2 * d * h * 2 + 2 * h * c * 3)
    flops_score = (n_train + n_test) * 2 * (d * h + h * c) * per_ckpt
    gather = 4 * n_train * d * 4
    bytes_step = {"per_run": gather + steps * 7 * n_params * 4, "shared": gather / k + steps * 7 * n_params * 4}
    bytes_score = per_ckpt * ((n_train + n_test) * d * 4 / k + (n_train + n_test) * h * 4 * 2 + n_params * 4)
    return {"flops_step": flops_step, "flops_score": flops_score, "bytes_step": bytes_step, "bytes_score": bytes_score}


def side_by_side(config: sweep.SweepConfig, shards: int, dataset) -> float:
    """Seconds for ``shards`` trainings of ``config.runs`` runs each, side by side in threads of this
    process with one intra-op thread each: what ``gptpipe collect`` runs (one shard per core)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    workers = [threading.Thread(target=sweep.train_runs, args=(config, range(i * config.runs, (i + 1) * config.runs), dataset))
               for i in range(shards)]
    t = time.perf_counter()
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    seconds = time.perf_counter() - t
    torch.set_num_threads(before)
    return seconds


def bench_roofline(args) -> None:
    """The trainer against its bound, run two ways: one training of K runs on all ``--threads`` threads,
    and ``--threads`` trainings of K runs side by side, one thread each (as ``gptpipe collect`` runs
    its shards)."""
    torch.set_num_threads(args.threads)
    dataset = data.load("mnist5k")
    problem = problems.get("mnist_mlp")
    config = sweep.SweepConfig(problem="mnist_mlp", runs=args.k, epochs=args.epochs, checkpoints=args.checkpoints)
    peak = matmul_peak_gflops() * 1e9
    bw = memory_bandwidth_gbs()
    model = roofline_model(problem, config, len(dataset.x_train), len(dataset.x_test), args.k)
    sweep.train_runs(sweep.SweepConfig(problem="mnist_mlp", runs=4, epochs=1, checkpoints=2), range(4), dataset)  # warm-up
    measured, side = {}, {}
    for order in ("per_run", "shared"):
        run_config = sweep.SweepConfig(**{**config.to_dict(), "data_order": order})
        t = time.perf_counter()
        sweep.train_runs(run_config, range(args.k), dataset)
        measured[order] = args.k * args.epochs / (time.perf_counter() - t)
        side[order] = args.threads * args.k * args.epochs / side_by_side(run_config, args.threads, dataset)
    row = {"problem": "mnist_mlp/mnist5k", "threads": args.threads, "k": args.k, "epochs": args.epochs,
           "checkpoints": args.checkpoints, "fp32_peak_gflops": round(peak / 1e9, 1),
           "copy_gbs": round(bw["copy"], 1), "triad_gbs": round(bw["triad"], 1),
           "mflop_step": round(model["flops_step"] / 1e6, 1), "mflop_score": round(model["flops_score"] / 1e6, 1),
           "mb_score": round(model["bytes_score"] / 1e6, 2)}
    bandwidth = bw["triad"] * 1e9
    t_score = max(model["flops_score"] / peak, model["bytes_score"] / bandwidth)
    for order in ("per_run", "shared"):
        t_step = max(model["flops_step"] / peak, model["bytes_step"][order] / bandwidth)
        bound = 1 / (t_step + t_score)
        row.update({f"{order}_mb_step": round(model["bytes_step"][order] / 1e6, 2),
                    f"{order}_step_bound_by": "memory" if model["bytes_step"][order] / bandwidth > model["flops_step"] / peak else "compute",
                    f"{order}_bound_net_epochs_per_s": round(bound, 1),
                    f"{order}_measured_net_epochs_per_s": round(measured[order], 1),
                    f"{order}_share_of_bound": round(measured[order] / bound, 3),
                    f"{order}_side_by_side_net_epochs_per_s": round(side[order], 1),
                    f"{order}_side_by_side_share_of_bound": round(side[order] / bound, 3)})
    row["score_bound_by"] = "memory" if model["bytes_score"] / bandwidth > model["flops_score"] / peak else "compute"
    record("roofline", **row)


def plain_loop(config: sweep.SweepConfig, runs: int, dataset) -> float:
    """Seconds for the textbook loop: one nn.Module + torch.optim.SGD per network, same recipe, same
    checkpoint scoring, data already in memory (no DataLoader, to be fair to the baseline)."""
    problem = problems.get(config.problem)
    n_train = len(dataset.x_train)
    per_epoch = math.ceil(n_train / config.batch_size)
    ckpts = set(sweep_config.checkpoint_steps(config, n_train).tolist())
    t = time.perf_counter()
    for r in range(runs):
        seed, u = sweep_config.run_seed(config.seed, r)
        g = torch.Generator().manual_seed(seed)
        model = problem.module()
        model.load_state_dict(problem.state_dict(problem.init([g])[0]))
        opt = torch.optim.SGD(model.parameters(), lr=sweep_config.run_lr(config, u), momentum=0.9, nesterov=True, weight_decay=5e-4)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=config.epochs * per_epoch)
        step = 0
        for _ in range(config.epochs):
            order = torch.randperm(n_train, generator=g)
            for b in range(per_epoch):
                idx = order[b * config.batch_size : (b + 1) * config.batch_size]
                loss = torch.nn.functional.cross_entropy(model(dataset.x_train[idx]), dataset.y_train[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
                step += 1
                if step in ckpts:
                    with torch.no_grad():
                        for x, y in ((dataset.x_train, dataset.y_train), (dataset.x_test, dataset.y_test)):
                            z = model(x)
                            torch.nn.functional.cross_entropy(z, y)
                            (z.argmax(1) != y).float().mean()
    return time.perf_counter() - t


def bench_trainer(args) -> None:
    torch.set_num_threads(args.threads)
    dataset = data.load("mnist5k")
    problem = problems.get("mnist_mlp")
    config = sweep.SweepConfig(problem="mnist_mlp", runs=args.k, epochs=args.epochs, checkpoints=args.checkpoints)
    peak = matmul_peak_gflops()
    sweep.train_runs(sweep.SweepConfig(problem="mnist_mlp", runs=4, epochs=1, checkpoints=2), range(4), dataset)  # warm-up
    t = time.perf_counter()
    sweep.train_runs(config, range(args.k), dataset)
    batched_s = time.perf_counter() - t
    t = time.perf_counter()  # the same runs with one data order per epoch for the sweep (data_order="shared")
    sweep.train_runs(sweep.SweepConfig(**{**config.to_dict(), "data_order": "shared"}), range(args.k), dataset)
    shared_s = time.perf_counter() - t
    plain_runs = max(2, args.k // 8)
    plain_s = plain_loop(config, plain_runs, dataset)
    batched = args.k * args.epochs / batched_s
    plain = plain_runs * args.epochs / plain_s
    gflops = batched * flops_per_network_epoch(problem, config, len(dataset.x_train), len(dataset.x_test)) / 1e9
    record("trainer", problem="mnist_mlp/mnist5k", threads=args.threads, k=args.k, epochs=args.epochs,
           batched_net_epochs_per_s=round(batched, 1), plain_net_epochs_per_s=round(plain, 1),
           speedup=round(batched / plain, 2), shared_order_net_epochs_per_s=round(args.k * args.epochs / shared_s, 1),
           shared_over_per_run_order=round(batched_s / shared_s, 2), batched_gflops=round(gflops, 1), fp32_peak_gflops=round(peak, 1),
           share_of_peak=round(gflops / peak, 3))


def gptpipe(*args: str, env: dict | None = None) -> float:
    t = time.perf_counter()
    subprocess.run([str(Path(sys.executable).parent / "gptpipe"), *args], check=True, env={**os.environ, **(env or {})})
    return time.perf_counter() - t


SERVERS = ("cold", "warm")


def server_env(server: str, scratch: str) -> dict:
    """The environment of a timed command, with no Prefect API configured. ``cold``: the command starts
    the local Prefect server (the benchmark's cold home, whose server retires a second after each
    command: a user's first command of the day); ``warm``: it finds it running (the benchmark's warm home,
    as every command after a user's first). Both homes' databases exist before the first timed command."""
    os.environ.pop("PREFECT_API_URL", None)
    home = f"{scratch}/prefect-{server}"
    env = {"PREFECT_HOME": home, **({"GPTPIPE_PREFECT_IDLE_S": "1"} if server == "cold" else {})}
    if server == "warm" or not os.path.exists(home):
        os.makedirs(home, exist_ok=True)
        subprocess.run([sys.executable, "-c", "from flows import local_server; local_server.connect()"], check=True,
                       cwd=REPO, env={**os.environ, **env})
    while server == "cold" and os.path.exists(f"{home}/gptpipe-server.json"):  # until the last one has retired
        time.sleep(0.2)
    return env


def catalog_json(store: str, sql: str) -> list[dict]:
    out = subprocess.run([str(Path(sys.executable).parent / "gptpipe"), "catalog", "--store", store, "--format", "json", sql],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out)


def bench_command(args) -> None:
    """What a user waits for: ``gptpipe collect`` of an mnist_mlp sweep, end to end (imports, the local
    Prefect server started (``cold``) or found (``warm``), data loading, store writes), against the
    per-network loop on the same recipe, the two measured in turn ``--repeats`` times so that a slow spell
    of the host hits both; medians. Each given data order and server state is one command per repeat, all
    against the same loop measurements. The loop trains every eighth run (its cost per network is
    constant) and is scaled to the sweep."""
    torch.set_num_threads(args.threads)
    dataset = data.load("mnist5k")
    config = sweep.SweepConfig(problem="mnist_mlp", runs=args.runs, epochs=args.epochs, checkpoints=args.checkpoints)
    loop_runs = max(2, args.runs // 8)
    scratch = f"/tmp/gptpipe-bench-command-{os.getpid()}"
    cases = [(order, server) for order in args.data_order for server in args.server]
    command_s, loop_s = {case: [] for case in cases}, []
    for rep in range(args.repeats):
        for order, server in cases:
            store = f"{scratch}/store-{rep}"
            command_s[order, server].append(gptpipe(
                "collect", "--store", store, "--sweep", "c", "--problem", "mnist_mlp", "--runs", str(args.runs),
                "--epochs", str(args.epochs), "--checkpoints", str(args.checkpoints), "--data-order", order,
                env=server_env(server, scratch)))
            subprocess.run(["rm", "-rf", store])
        loop_s.append(plain_loop(config, loop_runs, dataset) * args.runs / loop_runs)
    subprocess.run(["rm", "-rf", scratch])
    net_epochs = args.runs * args.epochs
    loop = net_epochs / statistics.median(loop_s)
    for (order, server), seconds in command_s.items():
        command = net_epochs / statistics.median(seconds)
        record("command", problem="mnist_mlp/mnist5k", runs=args.runs, epochs=args.epochs, checkpoints=args.checkpoints,
               data_order=order, prefect_server=server, command_workers=os.cpu_count(), command_threads_per_worker=1,
               loop_threads=args.threads, command_s=[round(x, 1) for x in seconds], loop_s=[round(x, 1) for x in loop_s],
               command_net_epochs_per_s=round(command, 1), loop_net_epochs_per_s=round(loop, 1), speedup=round(command / loop, 2))


def bench_overhead(args) -> None:
    """Wall x workers / summed task compute of a collect, and the command's fixed cost: the same command
    again on the finished sweep (imports, the local Prefect server, checks, summary, exit). For each
    ``--server`` state: ``cold``, the command starts the server (a user's first command); ``warm``, it
    finds it running."""
    scratch = f"/tmp/gptpipe-bench-overhead-{os.getpid()}"
    for server in args.server:
        store = f"{scratch}/store-{server}"
        collect = ("collect", "--store", store, "--sweep", "o", "--problem", args.problem, "--runs", str(args.runs),
                   "--shard-size", str(args.shard_size), "--workers", str(args.workers))
        wall = gptpipe(*collect, env=server_env(server, scratch))
        fixed = gptpipe(*collect, env=server_env(server, scratch))
        compute = catalog_json(store, "select sum(wall_s) as s from runs")[0]["s"]
        record("overhead", problem=args.problem, runs=args.runs, shard_size=args.shard_size, workers=args.workers,
               prefect_server=server, wall_s=round(wall, 1), summed_task_compute_s=round(compute, 1),
               wall_over_compute=round(wall / compute, 3), wall_x_workers_over_compute=round(wall * args.workers / compute, 3),
               fixed_s=round(fixed, 1))
    subprocess.run(["rm", "-rf", scratch])


def store_stats(path: str) -> tuple[int, int]:
    size = objects = 0
    for root, _, files in os.walk(path):
        for f in files:
            size += os.path.getsize(os.path.join(root, f))
            objects += 1
    return size, objects


QUERY = ("select floor(log10(lr) * 4) / 4 as log10_lr_bucket, count(*) as runs, min(c.test_loss) as best_test_loss "
         "from checkpoints c join runs using (sweep, run) group by 1 order by 1")


def bench_scale(args) -> None:
    for n in args.runs:
        store = f"{args.store_prefix}-{n}"
        wall = gptpipe("collect", "--store", store, "--sweep", f"scale{n}", "--problem", "digits_mlp", "--runs", str(n),
                       "--shard-size", str(args.shard_size))
        size, objects = store_stats(store)
        catalog_json(store, QUERY)  # warm the page cache
        t = time.perf_counter()
        for _ in range(3):
            rows = catalog_json(store, QUERY)
        query_s = (time.perf_counter() - t) / 3
        record("scale", problem="digits_mlp", runs=n, checkpoints=40, wall_s=round(wall, 1),
               store_mb=round(size / 2**20, 1), objects=objects, query_s=round(query_s, 2), buckets=len(rows),
               note="wall_s of the last (possibly resumed) collect call")


def bench_ppo(args) -> None:
    """CartPole's batched PPO (the recipe, log-spaced checkpoints, each scored over the evaluation
    episodes) on one thread: seconds per run for each shard size K, the K values taken in turn
    ``--repeats`` times (host speed drifts), medians; ratios against the first K."""
    from gptpipe.sweep import ppo

    torch.set_num_threads(1)
    problem = problems.get("cartpole")
    per_run: dict[int, list[float]] = {k: [] for k in args.k}
    for _ in range(args.repeats):
        for k in args.k:
            config = sweep.SweepConfig(problem="cartpole", runs=k, shard_size=k, checkpoint_spacing="log", epochs=args.epochs)
            t = time.perf_counter()
            ppo.train_runs(problem, config, range(k))
            per_run[k].append((time.perf_counter() - t) / k)
    base = statistics.median(per_run[args.k[0]])
    for k in args.k:
        s = statistics.median(per_run[k])
        print(f"K={k:4d}: {s:.3f} s per run ({base / s:.2f}x K={args.k[0]})")
    record("ppo", problem="cartpole", epochs=args.epochs, threads=1, repeats=args.repeats,
           s_per_run={k: round(statistics.median(v), 4) for k, v in per_run.items()},
           samples={k: [round(x, 4) for x in v] for k, v in per_run.items()})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    t = sub.add_parser("trainer")
    t.add_argument("--k", type=int, default=64)
    t.add_argument("--epochs", type=int, default=5)
    t.add_argument("--checkpoints", type=int, default=9)
    t.add_argument("--threads", type=int, default=os.cpu_count())
    r = sub.add_parser("roofline")
    r.add_argument("--k", type=int, default=64)
    r.add_argument("--epochs", type=int, default=5)
    r.add_argument("--checkpoints", type=int, default=9)
    r.add_argument("--threads", type=int, default=os.cpu_count())
    c = sub.add_parser("command")
    c.add_argument("--runs", type=int, default=256)
    c.add_argument("--epochs", type=int, default=25)
    c.add_argument("--checkpoints", type=int, default=40)
    c.add_argument("--data-order", nargs="+", default=["per_run"], choices=["per_run", "shared"])
    c.add_argument("--server", nargs="+", default=["cold"], choices=SERVERS)
    c.add_argument("--repeats", type=int, default=3)
    c.add_argument("--threads", type=int, default=os.cpu_count())
    o = sub.add_parser("overhead")
    o.add_argument("--problem", default="mnist_mlp")
    o.add_argument("--runs", type=int, default=1000)
    o.add_argument("--shard-size", type=int, default=64)
    o.add_argument("--workers", type=int, default=os.cpu_count())
    o.add_argument("--server", nargs="+", default=["cold", "warm"], choices=SERVERS)
    s = sub.add_parser("scale")
    s.add_argument("--runs", type=int, nargs="+", default=[1000, 10000, 100000])
    s.add_argument("--shard-size", type=int, default=256)
    s.add_argument("--store-prefix", default="/tmp/gptpipe-bench-scale")
    q = sub.add_parser("ppo")
    q.add_argument("--k", type=int, nargs="+", default=[16, 32, 64, 128])
    q.add_argument("--epochs", type=int, default=80)
    q.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()
    {"trainer": bench_trainer, "roofline": bench_roofline, "command": bench_command, "overhead": bench_overhead,
     "scale": bench_scale, "ppo": bench_ppo}[args.what](args)


if __name__ == "__main__":
    main()
