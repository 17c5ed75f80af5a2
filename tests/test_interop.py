"""Import of the official G.pt checkpoint-dataset layout and export to plain PyTorch.

The fixtures write small LMDB folders exactly as the authors' data-generation scripts do: raw float32
bytes of the flattened state_dict under ``{run}/ep{EEE}_it{IIIII}.pt``, the per-tensor sizes (float32)
under ``{key}_arch``, ``runs.json`` with percent errors, ``DONE.txt`` for finished runs, and one folder
merging two runs.
"""

from __future__ import annotations

import json
import math
import os

import lmdb
import numpy as np
import pytest
import torch

from gptpipe.problems.mlp import MLPClassifier
from gptpipe import data as datasets
from gptpipe import problems
from gptpipe.stages import interop
from storage import catalog, params, sweeps
from storage.store import StoreError, open_store

PROBLEM = problems.get("mnist_mlp")
C = 5  # checkpoints per run in these fixtures
EPOCH_ITERS = 468


@pytest.fixture(scope="module")
def mnist5k():
    return datasets.load("mnist5k")


def _vectors(seed: int, n: int, problem=PROBLEM) -> np.ndarray:
    g = torch.Generator().manual_seed(seed)
    start = problem.init([g])[0]
    steps = torch.randn(n, problem.n_params, generator=g) * 0.02
    return (start + torch.cumsum(steps, 0) - steps[0]).numpy().astype(np.float32)


def _keys(run: str, n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    steps = np.sort(rng.choice(np.arange(1, 25 * EPOCH_ITERS), size=n - 2, replace=False)).tolist() + [25 * EPOCH_ITERS]
    keys = [f"{run}/ep000_it00000.pt"]
    for s in steps:  # the key holds the epoch and the 1-based iteration within it
        epoch, it = divmod(s - 1, EPOCH_ITERS)
        keys.append(f"{run}/ep{epoch:03d}_it{it + 1:05d}.pt")
    return keys


def _metrics(vectors: np.ndarray, data) -> list[dict]:
    theta = torch.from_numpy(vectors)
    test = PROBLEM.evaluate(theta, data.x_test, data.y_test)
    batch = PROBLEM.evaluate(theta, data.x_train[:128], data.y_train[:128])  # theirs: one mini-batch
    return [{"avg_train_loss": float(batch["loss"][i]), "avg_train_err": float(batch["error"][i]) * 100.0,
             "avg_test_loss": float(test["loss"][i]), "avg_test_err": float(test["error"][i]) * 100.0}
            for i in range(len(vectors))]


def write_official(folder, runs: dict, done: bool = True, with_json: bool = True) -> None:
    """One official job folder: ``runs`` maps run name -> (keys, vectors, metrics or None, arch sizes)."""
    os.makedirs(folder, exist_ok=True)
    env = lmdb.open(str(folder), map_size=64 << 20, subdir=True)
    docs = {}
    with env.begin(write=True) as txn:
        for run, (keys, vectors, metrics, arch) in runs.items():
            doc = {"checkpoints": {}, "metadata": {"avg_test_loss": [], "avg_test_err": [], "optimal_test_loss": math.inf,
                                                   "optimal_test_err": math.inf, "min_parameter_val": math.inf,
                                                   "max_parameter_val": -math.inf}}
            for i, (key, v) in enumerate(zip(keys, vectors)):
                txn.put(key.encode(), np.asarray(v, dtype="<f4").tobytes())
                txn.put(f"{key}_arch".encode(), np.asarray(arch, dtype="<f4").tobytes())  # sizes, cast to float32
                if metrics is not None:
                    m = metrics[i]
                    doc["checkpoints"][key] = m
                    doc["metadata"]["avg_test_loss"].append(m["avg_test_loss"])
                    doc["metadata"]["avg_test_err"].append(m["avg_test_err"])
                    doc["metadata"]["optimal_test_loss"] = min(doc["metadata"]["optimal_test_loss"], m["avg_test_loss"])
                    doc["metadata"]["optimal_test_err"] = min(doc["metadata"]["optimal_test_err"], m["avg_test_err"])
            docs[run] = doc
    env.close()
    if with_json:
        body = docs[next(iter(docs))] if len(docs) == 1 else docs  # a merged folder: {run: runs.json}
        with open(os.path.join(folder, "runs.json"), "w") as f:
            json.dump(body, f, indent=2, sort_keys=True)
    if done:
        open(os.path.join(folder, "DONE.txt"), "w").close()


ARCH = [layer.numel for layer in PROBLEM.layers]  # [7840, 10, 100, 10]


@pytest.fixture(scope="module")
def official(tmp_path_factory, mnist5k):
    """Six runs in five folders: ok, diverged (NaN), unfinished, wrong arch, and two merged ok runs."""
    root = tmp_path_factory.mktemp("gpt") / "mnist"
    truth = {}

    def run(name, seed, n=C):
        v = _vectors(seed, n)
        keys = _keys(name, n, seed)
        m = _metrics(v, mnist5k)
        truth[name] = (keys, v, m)
        return keys, v, m

    k, v, m = run("000000", 0)
    write_official(root / "000000", {"000000": (k, v, m, ARCH)})
    k, v, m = run("000001", 1)
    v = v.copy()
    v[3, 17] = np.nan  # checkpoint 3 is non-finite: the run diverged after 3 good checkpoints
    truth["000001"] = (k, v, m)
    write_official(root / "000001", {"000001": (k, v, m, ARCH)})
    k, v, m = run("000002", 2, n=3)
    write_official(root / "000002", {"000002": (k, v, None, ARCH)}, done=False, with_json=False)
    wide = MLPClassifier("wide", 784, 20, 10, default_data="mnist5k", data_sources=("mnist5k",))
    vw = _vectors(3, C, wide)
    write_official(root / "000003", {"000003": (_keys("000003", C, 3), vw, [{"avg_train_loss": 1.0, "avg_train_err": 50.0,
                   "avg_test_loss": 1.0, "avg_test_err": 50.0}] * C, [layer.numel for layer in wide.layers])})
    a, b = run("000004", 4), run("000005", 5)
    write_official(root / "000004_000005", {"000004": (*a, ARCH), "000005": (*b, ARCH)})
    (root / "README.txt").write_text("not a run folder")
    return root, truth


EXPECTED = {"000000": ("ok", 5), "000001": ("diverged", 3), "000002": ("unfinished", 3), "000003": ("arch_mismatch", 0),
            "000004": ("ok", 5), "000005": ("ok", 5)}


def _check_store(url: str, sweep: str, truth: dict) -> None:
    store = open_store(url)
    runs = sweeps.committed_runs(store, sweep).to_pylist()
    assert [r["run"] for r in runs] == list(range(6))  # each run exactly once
    assert [r["source_run"] for r in runs] == sorted(EXPECTED)
    array = params.open_params(store, *sweeps.params_path(sweep))
    assert array.shape == (6, C, PROBLEM.n_params) and array.chunks == (1, C, PROBLEM.n_params)
    ckpts = catalog.query(store, f"select * from checkpoints where sweep = '{sweep}' order by run, ckpt").to_pylist()
    assert len(ckpts) == sum(n for _, n in EXPECTED.values())
    assert len({(c["run"], c["ckpt"]) for c in ckpts}) == len(ckpts)
    for r in runs:
        status, n = EXPECTED[r["source_run"]]
        assert (r["status"], r["n_ckpts"]) == (status, n), r
        assert r["digest"] == params.digest(array[r["run"], :n])
        assert r["seed"] == int(r["source_run"])
        if status != "ok":
            assert r["note"]
        if n == 0:
            continue
        keys, vectors, metrics = truth[r["source_run"]]
        np.testing.assert_array_equal(array[r["run"], :n], vectors[:n])  # value for value
        assert np.isnan(array[r["run"], n:]).all()
        rows = [c for c in ckpts if c["run"] == r["run"]]
        assert [c["source_key"] for c in rows] == keys[:n]
        assert rows[0]["step"] == 0 and rows[-1]["step"] <= 25 * EPOCH_ITERS
        assert all(a["step"] < b["step"] for a, b in zip(rows, rows[1:]))
        for c, m in zip(rows, metrics):
            if status == "unfinished":  # no runs.json: parameters without metrics
                assert math.isnan(c["test_loss"]) and math.isnan(c["train_error"])
                continue
            assert c["test_loss"] == m["avg_test_loss"] and c["train_loss"] == m["avg_train_loss"]
            assert c["test_error"] == pytest.approx(m["avg_test_err"] / 100.0, abs=1e-12)  # percent -> fraction
            assert c["train_error"] == pytest.approx(m["avg_train_err"] / 100.0, abs=1e-12)
            assert 0.0 <= c["test_error"] <= 1.0
        if status == "ok":
            assert r["best_test_loss"] == min(m["avg_test_loss"] for m in metrics)
            assert r["final_test_error"] == pytest.approx(metrics[-1]["avg_test_err"] / 100.0)
    config = sweeps.read_config(store, sweep)
    assert config["problem"] == "mnist_mlp" and config["n_runs"] == 6 and config["n_ckpts"] == C
    assert config["imported"]["source"] == os.path.abspath(config["imported"]["source"])
    assert config["imported"]["metrics"]["test_error"] == {"source": "avg_test_err", "scale": 0.01}


def test_layout_reader(official):
    root, truth = official
    assert interop.scan(str(root)) == [(r, r) for r in ("000000", "000001", "000002", "000003")] + [
        ("000004", "000004_000005"), ("000005", "000004_000005")]
    assert interop.scan(str(root / "000000")) == [("000000", "")]  # one run folder on its own
    _, layout = interop.layout_for("mnist_mlp")
    data = interop.read_run(str(root / "000004_000005"), "000005", PROBLEM, layout, C)
    assert data.status == "ok" and data.keys == truth["000005"][0]
    np.testing.assert_array_equal(data.params, truth["000005"][1])
    epoch, it = int(data.keys[2].split("/ep")[1][:3]), int(data.keys[2].split("_it")[1][:5])
    assert data.steps[2] == epoch * EPOCH_ITERS + it and data.epochs[2] == pytest.approx(data.steps[2] / EPOCH_ITERS)
    assert interop.read_run(str(root / "000004_000005"), "000004", PROBLEM, layout, 3).status == "truncated"
    assert interop.read_run(str(root / "000000"), "000000", PROBLEM, layout, 8).status == "short"


def test_damaged_runs_json_is_recorded_and_the_import_goes_on(official, tmp_path):
    import shutil

    root, truth = official
    damaged = tmp_path / "mnist" / "000000"
    shutil.copytree(root / "000000", damaged)
    (damaged / "runs.json").write_bytes(b'{"checkpoints": {"000000/ep000_it')  # cut off mid-write
    _, layout = interop.layout_for("mnist_mlp")
    data = interop.read_run(str(damaged), "000000", PROBLEM, layout, C)
    assert data.status == "corrupt" and "runs.json unreadable: JSONDecodeError" in data.notes
    np.testing.assert_array_equal(data.params, truth["000000"][1])  # the parameters are kept, metrics unknown
    assert np.isnan(data.metrics["test_loss"]).all()
    summary = interop.import_all(str(tmp_path / "store"), "d", "mnist_mlp", str(tmp_path / "mnist"), n_ckpts=C, shard_size=2)
    assert summary["runs"] == 1 and summary.get("corrupt") == 1


def test_import_round_trip(official, tmp_path):
    root, truth = official
    url = str(tmp_path / "store")
    summary = interop.import_all(url, "g", "mnist_mlp", str(root), n_ckpts=C, shard_size=2)
    assert summary["runs"] == 6 and summary["ok"] == 3 and summary["arch_mismatch"] == 1
    _check_store(url, "g", truth)
    store = open_store(url)
    assert {r["status"] for r in interop.report_rows(store, "g")} == {"diverged", "unfinished", "arch_mismatch"}
    # the same import again is a no-op; another source under the same name is refused
    before = sorted(os.listdir(tmp_path / "store" / "catalog" / "runs" / "sweep=g"))
    assert interop.import_all(url, "g", "mnist_mlp", str(root), n_ckpts=C, shard_size=2) == summary
    assert sorted(os.listdir(tmp_path / "store" / "catalog" / "runs" / "sweep=g")) == before
    with pytest.raises(interop.StoreError, match="already exists with another config"):
        interop.check(url, "g", "mnist_mlp", str(root / "000000"), C, 2)
    # the catalog answers across imported sweeps like any other
    out = catalog.query(store, "select status, count(*) as n from runs where sweep = 'g' group by 1 order by 1").to_pylist()
    assert {r["status"]: r["n"] for r in out} == {"arch_mismatch": 1, "diverged": 1, "ok": 3, "unfinished": 1}


def test_export_loads_into_module_and_reproduces_test_loss(official, tmp_path, mnist5k):
    root, truth = official
    url = str(tmp_path / "store")
    interop.import_all(url, "g", "mnist_mlp", str(root), n_ckpts=C, shard_size=4)
    store = open_store(url)
    from safetensors.torch import load_file

    for out in (tmp_path / "net.safetensors", tmp_path / "net.pt"):
        meta = interop.export(store, str(out), sweep="g", run=5, ckpt=4)
        state = load_file(str(out)) if out.suffix == ".safetensors" else torch.load(out, weights_only=True)
        module = problems.get(meta["problem"]).module()
        module.load_state_dict(state)  # strict: every name and shape matches
        with torch.no_grad():
            loss = torch.nn.functional.cross_entropy(module(mnist5k.x_test), mnist5k.y_test).item()
        stored = catalog.query(store, "select test_loss from checkpoints where sweep = 'g' and run = 5 and ckpt = 4")["test_loss"][0].as_py()
        assert loss == pytest.approx(stored, rel=1e-5, abs=1e-6)
    with pytest.raises(interop.InteropError, match="has 0 checkpoints"):
        interop.export(store, str(tmp_path / "x.safetensors"), sweep="g", run=3, ckpt=0)
    assert not (tmp_path / "x.safetensors").exists()


def test_export_eval_row(tmp_path, mnist5k):
    """An evaluation folder as the evaluate stage writes it: params.zarr row-aligned with results.parquet."""
    import pyarrow as pa

    store = open_store(str(tmp_path / "store"), create=True)
    vectors = _vectors(7, 3)
    params.write_rows(store, ("evals", "e1", "params.zarr"), vectors)
    catalog.write_table(store, pa.table({"eval": ["e1"] * 3, "problem": ["mnist_mlp"] * 3, "network": [0, 1, 2],
                                         "achieved": [1.0, 2.0, 3.0]}), "evals", "e1", "results.parquet")
    meta = interop.export(store, str(tmp_path / "g.safetensors"), eval="e1", row=1)
    assert meta["problem"] == "mnist_mlp" and meta["network"] == "1"
    from safetensors import safe_open
    from safetensors.torch import load_file

    module = PROBLEM.module()
    module.load_state_dict(load_file(str(tmp_path / "g.safetensors")))
    np.testing.assert_array_equal(torch.cat([p.detach().flatten() for p in module.state_dict().values()]).numpy(), vectors[1])
    with safe_open(str(tmp_path / "g.safetensors"), "pt") as f:
        assert f.metadata()["eval"] == "e1"
    with pytest.raises(interop.InteropError, match="rows 0..2"):
        interop.export(store, str(tmp_path / "h.safetensors"), eval="e1", row=3)
    with pytest.raises(StoreError, match="no evaluation 'e2'"):
        interop.export(store, str(tmp_path / "h.safetensors"), eval="e2", row=0)


def test_bad_input_in_process(official, tmp_path):
    """The CLI's one-line errors (exit 2) and nothing written (typer's runner: no subprocess, no server)."""
    from typer.testing import CliRunner

    from flows.cli import app

    root, _ = official
    store = tmp_path / "s"
    runner = CliRunner()
    cases = [
        (["import-gpt", "--store", str(store), "--sweep", "x", "--problem", "nope", str(root)], "unknown problem 'nope'"),
        (["import-gpt", "--store", str(store), "--sweep", "x", "--problem", "digits_mlp", str(root)], "no official G.pt checkpoint dataset"),
        (["import-gpt", "--store", str(store), "--sweep", "x", "--problem", "mnist_mlp", str(tmp_path / "none")], "is not a folder"),
        (["import-gpt", "--store", str(store), "--sweep", "x", "--problem", "mnist_mlp", str(tmp_path)], "no G.pt run folders"),
        (["import-gpt", "--store", str(store), "--sweep", "bad name", "--problem", "mnist_mlp", str(root)], "invalid sweep name"),
        (["export", "--store", str(store), "--sweep", "x", str(tmp_path / "o.safetensors")], "--sweep needs --run and --ckpt"),
        (["export", "--store", str(store), "--eval", "e", "--row", "0", "--sweep", "x", str(tmp_path / "o.pt")], "name either"),
        (["export", "--store", str(store), "--eval", "e", "--row", "0", str(tmp_path / "o.pt")], "does not exist"),
    ]
    for args, message in cases:
        result = runner.invoke(app, args)
        assert result.exit_code == 2, (args, result.output)
        assert message in result.output and result.output.strip().count("\n") == 0, (args, result.output)
    assert not store.exists() and not (tmp_path / "o.pt").exists()


@pytest.mark.slow
def test_cli_resume_exactly_once(cli, official, tmp_path):
    """An import killed part-way (shard 0 committed, shard 1 half-written) finishes with the CLI, and every
    run and checkpoint is in the catalog exactly once."""
    root, truth = official
    url = str(tmp_path / "store")
    todo = interop.prepare(url, "g", "mnist_mlp", str(root), n_ckpts=C, shard_size=2)
    assert todo == [0, 1, 2]
    store = open_store(url)
    interop.import_shard(store, "g", 0)
    config = sweeps.read_config(store, "g")
    _, layout = interop.layout_for("mnist_mlp")
    source, plan = interop.import_plan(store, "g")
    rows, _ = interop.shard_rows(PROBLEM, layout, config, 1, [2, 3], plan, source)
    array = sweeps.writable_params(store, "g")
    for k, r in enumerate(rows.runs):  # died after its parameter chunks and checkpoints file, before the commit
        array[r] = rows.blocks[k]
    catalog.write_shard(store, "checkpoints", "g", 1, rows.checkpoints)
    committed = tmp_path / "store" / "catalog" / "runs" / "sweep=g" / "shard-000000.parquet"
    stamp = committed.stat().st_mtime_ns
    proc = cli("import-gpt", "--store", url, "--sweep", "g", "--problem", "mnist_mlp", "--checkpoints", str(C),
               "--shard-size", "2", str(root), check=True)
    assert "runs=6" in proc.stdout and "ok=3" in proc.stdout, proc.stdout
    assert "arch_mismatch" in proc.stderr and "000003" in proc.stderr  # the report names the bad runs
    assert committed.stat().st_mtime_ns == stamp  # the committed shard was skipped
    _check_store(url, "g", truth)
    proc = cli("export", "--store", url, "--sweep", "g", "--run", "0", "--ckpt", "2", str(tmp_path / "n.safetensors"), check=True)
    assert "mnist_mlp" in proc.stdout and (tmp_path / "n.safetensors").exists()
