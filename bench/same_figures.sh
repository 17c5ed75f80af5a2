#!/bin/bash
# Does a change keep the figures? Collects the same sweeps (digits SGD, CartPole PPO, mnist with shared
# data order and log spacing), trains and evaluates the same G.pt with the code of REV and with this
# working tree, and compares digests, catalog rows, losses, weights and the evaluation summary.
#   bench/same_figures.sh REV          e.g. bench/same_figures.sh 7c44a4a     (about 8 min on 2 cores)
set -euo pipefail
rev=${1:?usage: bench/same_figures.sh REV}
repo=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d)
trap 'git -C "$repo" worktree remove --force "$work/before" >/dev/null 2>&1 || true; rm -rf "$work"' EXIT
git -C "$repo" worktree add -q --detach "$work/before" "$rev"
export PREFECT_SERVER_ANALYTICS_ENABLED=false DO_NOT_TRACK=1 PREFECT_LOGGING_LEVEL=WARNING OMP_NUM_THREADS=1
for side in before after; do
  code=$work/before; [ $side = after ] && code=$repo
  S=$work/store-$side
  g() { PYTHONPATH=$code "$repo/.venv/bin/python" -c "from flows.cli import app; app()" "$@" >> "$work/$side.log"; }
  g collect --store "$S" --sweep d --problem digits_mlp --runs 64 --shard-size 32 --epochs 3 --checkpoints 6 --workers 1
  g collect --store "$S" --sweep c --problem cartpole --runs 8 --shard-size 8 --epochs 4 --checkpoints 5 --workers 1
  g collect --store "$S" --sweep m --problem mnist_mlp --runs 16 --shard-size 16 --epochs 1 --checkpoints 4 \
    --data-order shared --checkpoint-spacing log --lr-min 0.02 --lr-max 0.1 --workers 1
  g train --store "$S" --sweep d --model g --steps 40 --save-every 20
  g evaluate --store "$S" --model g --eval e --networks 8 --prompts 4
done
WORK=$work "$repo/.venv/bin/python" - <<'PY'
import os
from storage import catalog
from storage.store import open_store
work = os.environ["WORK"]
before, after = open_store(f"{work}/store-before"), open_store(f"{work}/store-after")
same = {}
for sweep in ("d", "c", "m"):
    for table, sql in (("runs", "select * exclude (sweep, wall_s, created_at) from runs where sweep = ? order by run"),
                       ("checkpoints", "select * exclude (sweep) from checkpoints where sweep = ? order by run, ckpt")):
        same[f"{sweep} {table}"] = catalog.query(before, sql, [sweep]).equals(catalog.query(after, sql, [sweep]))
log = lambda s: s.fs.cat_file(s.path("models", "g", "train_log.csv"))
same["training losses"] = log(before) == log(after)
summary = lambda s: {k: v for k, v in s.read_json("evals", "e", "summary.json").items()
                     if not k.endswith(("_s", "_at", "code_version"))}
same["evaluation summary"] = summary(before) == summary(after)
for what, ok in same.items():
    print(f"{what:24s} {'same' if ok else 'DIFFERENT'}")
raise SystemExit(0 if all(same.values()) else 1)
PY
