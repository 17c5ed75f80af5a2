"""A trained G.pt on the user's own network: `gptpipe prompt` and `TrainedGpt`, as a user calls them."""

import dataclasses
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from gptpipe import data
from gptpipe.gpt.trainer import TrainConfig, Trainer
from gptpipe.stages import collect, train
from gptpipe.stages.prompt import PromptError, TrainedGpt
from gptpipe.sweep.config import SweepConfig
from storage import models
from storage.store import open_store
from tests.conftest import invoke, run_cli

REPO = Path(__file__).resolve().parents[1]
SMALL = dict(width=64, depth=2, heads=2, num_frequencies=16)


@pytest.fixture(scope="module")
def digits_model(tmp_path_factory):
    """A digits sweep and a small G.pt trained on it (no Prefect: the stages directly), as store URL."""
    url = str(tmp_path_factory.mktemp("prompt") / "store")
    config = SweepConfig(problem="digits_mlp", runs=256, epochs=5, checkpoints=10, shard_size=64, lr_min=0.1, lr_max=0.3)
    for shard in collect.prepare(url, "d", config, None):
        collect.collect_shard(open_store(url), "d", shard)
    store = open_store(url)
    training = train.load_training_data(store, ["d"])
    config = TrainConfig(model=SMALL, steps=400, batch_size=64, warmup=50)  # more overfits 256 runs
    trainer = Trainer(training.problem, training.params, training.metric_values, config)
    trainer.train()
    train.save_model(store, "g", trainer, {**training.lineage, "train_config": config.to_dict(), "best": training.best})
    return url


def users_network(seed: int = 0, hidden: int = 10) -> torch.nn.Module:
    """The user's own module, built and initialised here, not by the project."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(64, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 10))


def digits_test_loss(net: torch.nn.Module) -> float:
    digits = data.load("digits")
    with torch.no_grad():
        return float(torch.nn.functional.cross_entropy(net(digits.x_test), digits.y_test))


def test_api_returns_a_state_dict_the_users_module_loads_and_that_scores_better(digits_model):
    gpt = TrainedGpt.load(digits_model, "g")
    net = users_network()
    before = digits_test_loss(net)
    net.load_state_dict(gpt.prompt(net.state_dict(), target=gpt.trained_range[0], samples=8))
    after = digits_test_loss(net)
    assert after < before - 0.3, (before, after)  # a random init: 2.3
    # two recursive updates, three candidates each: the last update's candidates, best first, as scored
    result = gpt.update(users_network(1).state_dict(), target=gpt.trained_range[0], samples=3, steps=2)
    assert len(result.state_dicts) == 3 and result.achieved == sorted(result.achieved)
    for state_dict, achieved in zip(result.state_dicts, result.achieved):
        net.load_state_dict(state_dict)
        assert abs(digits_test_loss(net) - achieved) < 1e-4


def test_target_beyond_the_trained_range_is_allowed_and_said(digits_model):
    gpt = TrainedGpt.load(digits_model, "g")
    best, worst = gpt.trained_range
    assert best < worst
    assert "better than the best" in gpt.update(users_network().state_dict(), target=best / 10).note
    assert gpt.update(users_network().state_dict(), target=(best + worst) / 2).note is None


def test_cli_prompt_writes_a_loadable_state_dict(digits_model, tmp_path):
    net = users_network(2)
    torch.save(net.state_dict(), tmp_path / "mine.pt")
    proc = run_cli("prompt", str(tmp_path / "mine.pt"), str(tmp_path / "new.safetensors"), "--target", "0.2",
                   "--store", digits_model, "--model", "g", "--samples", "4", check=True)
    start, got = map(float, re.search(r"test_loss: start ([\d.]+) -> ([\d.]+)", proc.stdout).groups())
    net.load_state_dict(load_file(tmp_path / "new.safetensors"))
    assert abs(digits_test_loss(net) - got) < 5e-3 and got < start  # the line prints 4 significant digits


def test_without_the_data_every_sample_comes_back_unscored(digits_model):
    gpt = dataclasses.replace(TrainedGpt.load(digits_model, "g"), dataset=None, scored=False)  # as for cifar without --data-root
    sd = users_network().state_dict()
    with pytest.raises(PromptError, match="--current"):
        gpt.update(sd, target=0.3)
    result = gpt.update(sd, target=0.3, samples=2, current=2.3)
    assert len(result.state_dicts) == 2 and result.achieved is None and result.start == 2.3
    for state_dict in result.state_dicts:
        users_network().load_state_dict(state_dict)


@pytest.mark.parametrize("case, expected", [
    ("wrong_shape", "tensor '0.weight' has shape [12, 64]; digits_mlp needs [10, 64]"),
    ("pickled_module", "is not a weights-only state_dict"),
    ("unknown_model", "no model 'nope'"),
    ("other_metric", "is prompted with test_loss, not test_error"),
])
def test_cli_bad_input_is_one_line_and_writes_nothing(digits_model, tmp_path, case, expected):
    path, args = tmp_path / "in.pt", []
    if case == "wrong_shape":
        torch.save(users_network(hidden=12).state_dict(), path)
    elif case == "pickled_module":
        torch.save(users_network(), path)  # the whole module (pickle), not its state_dict
    else:
        torch.save(users_network().state_dict(), path)
        args = ["--model", "nope"] if case == "unknown_model" else ["--metric", "test_error"]
    proc = invoke("prompt", str(path), str(tmp_path / "out.safetensors"), "--target", "0.3", "--store", digits_model, *args)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0, proc.stderr
    assert expected in proc.stderr
    assert not (tmp_path / "out.safetensors").exists()


def test_api_errors_name_the_problem(digits_model):
    gpt = TrainedGpt.load(digits_model, "g")
    with pytest.raises(PromptError, match="'2.bias' is missing"):
        gpt.prompt({k: v for k, v in users_network().state_dict().items() if k != "2.bias"}, target=0.3)
    with pytest.raises(PromptError, match="'3.weight' is not part"):
        gpt.prompt({**users_network().state_dict(), "3.weight": torch.zeros(1)}, target=0.3)


def test_readme_python_example_runs_as_written(digits_model, monkeypatch):
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## Prompt your own network"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    monkeypatch.setenv("GPTPIPE_STORE", digits_model)
    namespace = {}
    torch.manual_seed(0)  # the example's network is initialised at random
    exec(compile(code, "README.md", "exec"), namespace)
    assert isinstance(namespace["net"], torch.nn.Module) and digits_test_loss(namespace["net"]) < 2.15


def test_prompts_go_through_the_models_calibration_once_it_has_one(digits_model):
    """Fitted as an evaluation fits it, the calibration is what `TrainedGpt` conditions on; a request in
    the middle of the range is then delivered more closely, on average over users' networks, than asked raw."""
    from gptpipe.stages import evaluate

    raw = TrainedGpt.load(digits_model, "g")
    assert raw.calibration_map is None and raw.prompt_for(2.3, 1.0) == 1.0
    store = open_store(digits_model)
    session = evaluate.open_session(store, evaluate.EvalRequest(model="g", eval="unused"))
    models.write_calibration(store, "g", evaluate.fit_calibration(session).to_dict())
    calibrated = TrainedGpt.load(digits_model, "g")
    assert calibrated.calibration_map["step"] == 400 and calibrated.prompt_for(2.3, 1.0) != 1.0
    best = calibrated.trained_range[0]
    # the best is asked for as the prompt that delivers most, one that asks for better than the start
    top = calibrated.calibration_map["u"][-1]
    assert top > 0 and calibrated.prompt_for(2.3, best) == pytest.approx(2.3 + top * (best - 2.3))
    misses = {}
    for name, gpt in (("raw", raw), ("calibrated", calibrated)):
        achieved = []
        for seed in range(100, 116):
            start = digits_test_loss(users_network(seed))
            target = start + 0.5 * (best - start)
            achieved.append(gpt.update(users_network(seed).state_dict(), target=target, seed=seed).achieved[0] - target)
        misses[name] = abs(float(np.mean(achieved)))
    assert misses["calibrated"] < misses["raw"], misses
