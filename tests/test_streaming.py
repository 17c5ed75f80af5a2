"""Training pairs streamed from the store for training sets bigger than the memory budget."""

import numpy as np
import pytest
import torch

from gptpipe import problems
from gptpipe.stages import collect
from gptpipe.stages import train as train_stage
from storage import models
from gptpipe.sweep import SweepConfig
from gptpipe.gpt.trainer import TrainConfig, Trainer
from storage import sweeps
from storage.store import open_store

DIGITS = problems.get("digits_mlp")
MICRO = dict(width=32, depth=1, heads=2, num_frequencies=8)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    url = str(tmp_path_factory.mktemp("stream") / "store")
    config = SweepConfig(problem="digits_mlp", runs=40, shard_size=20, epochs=2, checkpoints=5)
    for shard in collect.prepare(url, "s", config, None):
        collect.collect_shard(open_store(url), "s", shard)
    return open_store(url)


def test_small_sweeps_stay_in_memory(store):
    data = train_stage.load_training_data(store, ["s"])
    assert not data.streamed and data.params.shape == (36, 5, DIGITS.n_params)


def test_tiny_budget_streams_pairs_from_training_runs_only(store):
    data = train_stage.load_training_data(store, ["s"], budget=1000)
    assert data.streamed and data.params is None and data.metric_values.shape == (36, 5)
    held = set(data.lineage["heldout_runs"]["s"])
    train_ids = np.setdiff1d(np.arange(40), sorted(held))
    assert len(held) == 4 and len(train_ids) == 36
    everything = sweeps.read_blocks(store, "s", np.arange(40))  # [40, C, P] to check against
    stream = data.stream(16, pairing="mixed", symmetry="none", seed=3, group_runs=8, spans=2, batches_per_group=3)
    seen_groups = set()
    with stream:
        for _ in range(12):
            b = stream.next()
            assert (b["i"] < b["j"]).all() and (b["j"] < 5).all()
            run_ids = train_ids[b["run"].numpy()]  # training-set positions -> run numbers
            assert not held & set(run_ids.tolist())
            # drawn from the 4 resident groups of at most 8 runs each, not from one alone
            assert set(b["run"].tolist()) <= set(b["group_runs"].tolist()) and 8 < len(b["group_runs"]) <= 4 * 8
            assert len(set(b["run"].tolist())) > 8
            seen_groups.add(tuple(b["group_runs"].tolist()))
            # the pair is checkpoints i and j of one and the same stored run, with that run's metrics
            np.testing.assert_array_equal(b["theta_i"].numpy(), everything[run_ids, b["i"].numpy()])
            np.testing.assert_array_equal(b["theta_j"].numpy(), everything[run_ids, b["j"].numpy()])
            np.testing.assert_array_equal(b["metric_i"].numpy(), data.metric_values[b["run"].numpy(), b["i"].numpy()].astype(np.float32))
    assert len(seen_groups) >= 3  # several groups were read, many batches from each
    assert stream.thread is None  # closed


def test_trainer_trains_from_a_stream(store):
    data = train_stage.load_training_data(store, ["s"], budget=1000)
    cfg = TrainConfig(model=MICRO, steps=6, batch_size=16, warmup=2, seed=0)
    stream = data.stream(16, cfg.pairing, cfg.init_frac, cfg.symmetry, seed=0, group_runs=8, spans=2, batches_per_group=2)
    trainer = Trainer(DIGITS, None, data.metric_values, cfg, stream=stream)
    try:
        losses = trainer.train()
    finally:
        trainer.close()
    assert trainer.step == 6 and all(np.isfinite(losses)) and stream.groups_read >= 2
    assert len(trainer.gpt_config.param_scale) == 4  # normalisation fitted on a sample of the stream


def test_stream_surfaces_read_errors():
    def broken(idx):
        raise OSError("store unreachable")

    from gptpipe.gpt.pairs import StreamingPairs

    s = StreamingPairs(DIGITS, broken, np.zeros((4, 3)), 8)
    with pytest.raises(RuntimeError, match="store unreachable"):
        s.next()
    s.close()


def test_run_training_streams_over_budget_and_saves(store):
    from gptpipe.stages.train import run_training

    data = train_stage.load_training_data(store, ["s"], budget=0)
    summary = run_training(data, store.url, "streamed", dict(steps=4, batch_size=16), save_every=2)
    assert summary["streamed"] and summary["step"] == 4
    assert models.read_lineage(store, "streamed")["step"] == 4


def test_a_trained_model_is_reported_without_reading_its_checkpoints(store):
    from gptpipe.stages.train import run_training

    options = dict(model=MICRO, steps=3, batch_size=16, warmup=1)
    first = run_training(train_stage.load_training_data(store, ["s"]), store.url, "done", options)
    data = train_stage.load_training_data(store, ["s"])
    reads = []
    read_all = data.read_all
    data.read_all = lambda: reads.append(1) or read_all()
    again = run_training(data, store.url, "done", options)  # already at its 3 steps: a re-run (a demo's) reads nothing
    assert reads == [] and again["step"] == again["resumed_at_step"] == 3
    assert again["final_loss"] == pytest.approx(first["final_loss"], rel=1e-5)
    further = run_training(data, store.url, "done", {**options, "steps": 4})  # more steps: now the checkpoints are read
    assert reads == [1] and further["step"] == 4 and further["resumed_at_step"] == 3
