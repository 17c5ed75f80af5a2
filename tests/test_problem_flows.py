"""The other kinds of problem through the same flows as digits_mlp (tests/test_pipeline.py): an RL
problem (cartpole) and a convolutional one (cifar_cnn), each collected, trained and evaluated on the
session's real Prefect server and checked from the store."""

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from gptpipe import data, problems
from gptpipe.evaluation import calibration
from storage import catalog, models, params
from storage.store import open_store
from tests.test_cifar import write_cifar

pytestmark = pytest.mark.slow


def test_rl_problem_goes_through_the_same_flows(tmp_path, prefect_api, monkeypatch):
    """cartpole (metric `return`, higher is better, no differentiable loss): collect, train, evaluate."""
    from flows.collect import collect_flow
    from flows.evaluate import evaluate_flow
    from flows.train import train_flow

    url = str(tmp_path / "store")
    collect_flow(store=url, sweep="cp", problem="cartpole", runs=8, shard_size=8, epochs=3, checkpoints=4)
    train_flow(store=url, sweeps=["cp"], model="g", steps=2, batch_size=16, pairing="stay")  # the CartPole demo's pairs
    summary = evaluate_flow(store=url, model="g", eval="e", networks=2, prompts=3, recursive=2, calibration_networks=8)
    store = open_store(url)
    assert summary["metric"] == "return" and summary["best_in_sweeps"] == max(
        r["best_return"] for r in catalog.query(store, "select best_return from runs").to_pylist())
    rows = catalog.query(store, "select requested, prompted, achieved, start from evaluations where step = 1 and sample = 0").to_pylist()
    assert len(rows) == 2 * 3 and all(0 < r["achieved"] <= 500 for r in rows)
    # trained with pairs that stay: calibrated without the start's own value, and never prompted with it
    assert models.read_calibration(store, "g")["grid"] == list(calibration.grid_for("stay"))
    assert all(r["prompted"] != r["start"] for r in rows)
    # every start network had room to improve (a random policy can already balance near the sweep's best)
    assert all(r["start"] < 0.9 * summary["best_in_sweeps"] for r in rows)
    # and so is every calibration network (the calibration's first 512 seeds hold policies at 450+ of 500)
    from gptpipe.evaluation import sampling
    from gptpipe.stages import evaluate

    session = evaluate.open_session(store, evaluate.EvalRequest(model="g", eval="unused"))
    raw = session.problem.init([torch.Generator().manual_seed(sampling.CALIBRATION_SEED + k) for k in range(512)])
    raw_returns = session.problem.score(raw, None)["return"].double().numpy()
    assert not evaluate.has_room(session, raw_returns).all()
    drawn = []
    monkeypatch.setattr(sampling, "fit_calibration", lambda model, diffusion, problem, dataset, start, *rest: drawn.append(start))
    evaluate.fit_calibration(session, 512)
    returns = session.problem.score(torch.as_tensor(drawn[0]), None)["return"].double().numpy()
    assert len(returns) == 512 and evaluate.has_room(session, returns).all()
    report = store.fs.cat_file(store.path("evals", "e", "report.md")).decode()
    assert "one_step_return.png" in report and "optimisers_" not in report
    # the store-wide index shows the evaluation in its own metric (returns between 0 and 500, not NaN)
    row = next(line for line in store.fs.cat_file(store.path("evals", "index.md")).decode().splitlines() if line.startswith("| [e]"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[4] == "return"
    start, one_step = float(cells[7]), float(cells[8])
    assert start == pytest.approx(summary["start_return_mean"], abs=1e-3) and 0 < one_step <= 500


def test_cnn_problem_goes_through_the_same_flows(tmp_path, prefect_api):
    """cifar_cnn on files in CIFAR-10's layout (not the official bytes): collect, train, evaluate."""
    from flows.collect import collect_flow
    from flows.evaluate import evaluate_flow
    from flows.train import train_flow
    write_cifar(tmp_path / "data", n_train_per_batch=16, n_test=24)
    root, url = str(tmp_path / "data"), str(tmp_path / "store")
    collect_flow(store=url, sweep="cc", problem="cifar_cnn", data="cifar10", data_root=root, runs=4, shard_size=4,
                 epochs=2, checkpoints=3)
    train_flow(store=url, sweeps=["cc"], model="g", steps=2, batch_size=8)
    # the raw requests: fitting a calibration samples 64 x 17 CNNs of ~90 tokens each, two thirds of this test's
    # time, and calibration is the same code for every problem (tested on digits_mlp and CartPole)
    summary = evaluate_flow(store=url, model="g", eval="e", networks=2, prompts=3, recursive=2, data_root=root, calibrate=False,
                            optimiser_steps=8)
    store = open_store(url)
    assert summary["problem"] == "cifar_cnn" and summary["metric"] == "test_loss"
    rows = catalog.query(store, "select achieved, test_error from evaluations where step = 1 and sample = 0").to_pylist()
    assert len(rows) == 2 * 3 and all(r["achieved"] > 0 and 0 <= r["test_error"] <= 1 for r in rows)
    # the generated networks are stored and score as recorded on the same data
    stored = params.open_params(store, "evals", "e", "params.zarr")
    dataset = data.load("cifar10", root)
    with store.fs.open(store.path("evals", "e", "results.parquet")) as f:
        achieved = pq.read_table(f)["achieved"].to_pylist()
    assert stored.shape == (len(achieved), 5370)
    again = problems.get("cifar_cnn").score(torch.from_numpy(np.asarray(stored[:3])), dataset)["test_loss"].numpy()
    np.testing.assert_allclose(again, achieved[:3], rtol=1e-4)
