"""The batched sweep trainer against plain PyTorch, one network at a time."""

import math

import numpy as np
import pytest
import torch

from gptpipe import data, problems, sweep
from gptpipe.sweep import config as sweep_config


def train_alone(config: sweep.SweepConfig, run: int, dataset: data.Dataset) -> list[torch.Tensor]:
    """The textbook loop: nn.Module + torch.optim.SGD + CosineAnnealingLR, checkpoints as flat vectors."""
    problem = problems.get(config.problem)
    seed, u = sweep_config.run_seed(config.seed, run)
    g = torch.Generator().manual_seed(seed)
    model = problem.module()
    model.load_state_dict(problem.state_dict(problem.init([g])[0]))
    opt = torch.optim.SGD(model.parameters(), lr=sweep_config.run_lr(config, u), momentum=config.momentum,
                          nesterov=True, weight_decay=config.weight_decay)
    per_epoch = math.ceil(len(dataset.x_train) / config.batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=config.epochs * per_epoch)
    flat = lambda: torch.cat([p.detach().reshape(-1) for p in model.state_dict().values()]).clone()
    ckpt_steps = set(sweep_config.checkpoint_steps(config, len(dataset.x_train)).tolist())
    out, step = [flat()], 0
    order_gen = sweep_config.shared_order_generator(config.seed) if config.data_order == "shared" else g
    for _ in range(config.epochs):
        order = torch.randperm(len(dataset.x_train), generator=order_gen)
        for b in range(per_epoch):
            idx = order[b * config.batch_size : (b + 1) * config.batch_size]
            loss = torch.nn.functional.cross_entropy(model(dataset.x_train[idx]), dataset.y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            if step in ckpt_steps:
                out.append(flat())
    return out


@pytest.mark.parametrize("problem", ["digits_mlp", "mnist_mlp"])
def test_batched_equals_plain_training(problem):
    config = sweep.SweepConfig(problem=problem, runs=3, epochs=2, checkpoints=5)
    dataset = data.load(config.data)
    result = sweep.train_runs(config, range(3), dataset)
    assert result.params.shape == (3, 5, problems.get(problem).n_params)
    for k in range(3):
        plain = train_alone(config, k, dataset)
        assert len(plain) == 5
        for c in range(5):
            np.testing.assert_allclose(result.params[k, c], plain[c].numpy(), atol=2e-5, rtol=1e-4)
    # different runs really differ: own seed, own data order, own learning rate
    assert len(set(result.lrs)) == 3
    assert not np.allclose(result.params[0, -1], result.params[1, -1])


def test_metrics_are_the_modules_metrics():
    config = sweep.SweepConfig(problem="digits_mlp", runs=2, epochs=1, checkpoints=2)
    dataset = data.load("digits")
    result = sweep.train_runs(config, [5, 9], dataset)
    problem = problems.get("digits_mlp")
    model = problem.module()
    model.load_state_dict(problem.state_dict(torch.from_numpy(result.params[1, -1])))
    with torch.no_grad():
        logits = model(dataset.x_test)
    loss = torch.nn.functional.cross_entropy(logits, dataset.y_test).item()
    error = (logits.argmax(1) != dataset.y_test).float().mean().item()
    assert result.metrics["test_loss"][1, -1] == pytest.approx(loss, rel=1e-5)
    assert result.metrics["test_error"][1, -1] == pytest.approx(error, abs=1e-9)


@pytest.mark.parametrize("problem", ["digits_mlp", "mnist_mlp"])
@pytest.mark.parametrize("order", ["per_run", "shared"])
def test_closed_form_gradient_is_autograds(problem, order):
    p = problems.get(problem)
    dataset = data.load(p.default_data)
    g = torch.Generator().manual_seed(0)
    theta = p.init([torch.Generator().manual_seed(k) for k in range(5)]) + 0.05 * torch.randn(5, p.n_params, generator=g)
    n = len(dataset.x_train)
    idx = torch.randperm(n, generator=g)[:32] if order == "shared" else torch.randint(0, n, (5, 32), generator=g)
    x, y = dataset.x_train[idx], dataset.y_train[idx]
    closed = p.loss_gradient(theta, x, y)
    by_autograd = problems.Problem.loss_gradient(p, theta, x, y)
    assert closed.abs().max() > 1e-3
    torch.testing.assert_close(closed, by_autograd, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("name", ["sgd", "adam"])
def test_batched_optimisers_are_torch_optims_per_network(name):
    """Three networks, each its own learning rate and its own batches, updated as one stack: every row
    is what ``torch.optim`` does to that network alone."""
    from gptpipe.sweep.optim import BatchedAdam, BatchedSGD

    p, dataset, lrs = problems.get("digits_mlp"), data.load("digits"), [0.003, 0.01, 0.05]
    theta = p.init([torch.Generator().manual_seed(k) for k in range(3)])
    alone = [row.clone().requires_grad_(True) for row in theta]
    opts = [torch.optim.SGD([w], lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4) if name == "sgd" else
            torch.optim.Adam([w], lr=lr) for w, lr in zip(alone, lrs)]
    batched = (BatchedSGD(lrs, p.n_params, momentum=0.9, weight_decay=5e-4, nesterov=True) if name == "sgd" else
               BatchedAdam(theta, lrs))
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        idx = torch.randint(0, len(dataset.x_train), (3, 32), generator=g)
        batched.step(theta, p.loss_gradient(theta, dataset.x_train[idx], dataset.y_train[idx]))
        for k, (w, opt) in enumerate(zip(alone, opts)):
            opt.zero_grad()
            p.loss(w[None], dataset.x_train[idx[k]][None], dataset.y_train[idx[k]][None]).sum().backward()
            opt.step()
    assert not torch.allclose(theta[0], theta[1])
    torch.testing.assert_close(theta, torch.stack(alone).detach(), atol=2e-6, rtol=1e-4)


def test_error_breaks_ties_as_argmax_does():
    """A frozen (all-zero) network scores equal logits for every class: argmax picks class 0."""
    p = problems.get("digits_mlp")
    dataset = data.load("digits")
    theta = torch.zeros(2, p.n_params)
    theta[1] = p.init([torch.Generator().manual_seed(1)])[0]
    error = p.evaluate(theta, dataset.x_test, dataset.y_test)["error"]
    logits = p.logits(theta, dataset.x_test)
    torch.testing.assert_close(error, (logits.argmax(-1) != dataset.y_test).float().mean(1))
    assert error[0].item() == pytest.approx((dataset.y_test != 0).float().mean().item())


def test_mlp_scores_in_sample_blocks_are_the_modules_scores():
    """Scoring goes through the samples a block at a time (``samples``, here blocks that do not divide
    the split): every network's loss and error are those of its ``nn.Module`` on the whole split."""
    import torch.nn.functional as F

    p = problems.get("digits_mlp")
    dataset = data.load("digits")
    theta = p.init([torch.Generator().manual_seed(i) for i in range(3)]) * 4
    blocked = p.evaluate(theta, dataset.x_test, dataset.y_test, chunk=2, samples=37)
    for k in range(3):
        model = p.module()
        model.load_state_dict(p.state_dict(theta[k]))
        with torch.no_grad():
            logits = model(dataset.x_test)
        assert blocked["loss"][k].item() == pytest.approx(F.cross_entropy(logits, dataset.y_test).item(), rel=1e-5)
        assert blocked["error"][k].item() == pytest.approx((logits.argmax(1) != dataset.y_test).float().mean().item())


def test_a_training_gathers_its_batches_into_one_buffer(monkeypatch):
    """Every step's mini-batches go into the buffer made once for the training (a fresh 25 MB batch per
    step was faulted in again and again with two shards training in threads of one process)."""
    from gptpipe.sweep import sgd

    buffers = set()
    gather = sgd.batch_gradient

    def spy(problem, theta, dataset, idx, generators, batch):
        buffers.add(batch.data_ptr())
        return gather(problem, theta, dataset, idx, generators, batch)

    monkeypatch.setattr(sgd, "batch_gradient", spy)
    sweep.train_runs(sweep.SweepConfig(problem="digits_mlp", runs=3, epochs=2, checkpoints=2), range(3), data.load("digits"))
    assert len(buffers) == 1


def test_run_result_does_not_depend_on_grouping():
    config = sweep.SweepConfig(problem="digits_mlp", runs=4, epochs=1, checkpoints=3)
    dataset = data.load("digits")
    together = sweep.train_runs(config, range(4), dataset)
    alone = sweep.train_runs(config, [2], dataset)
    np.testing.assert_allclose(together.params[2], alone.params[0], atol=1e-6)


def test_divergence_is_recorded_not_dropped():
    config = sweep.SweepConfig(problem="digits_mlp", runs=2, epochs=3, checkpoints=6, lr_min=300.0, lr_max=400.0)
    result = sweep.train_runs(config, range(2), data.load("digits"))
    assert all(1 <= n < 6 for n in result.n_ckpts)
    for k, n in enumerate(result.n_ckpts):
        assert np.isfinite(result.params[k, :n]).all()
        assert np.isnan(result.params[k, n:]).all()


@pytest.mark.parametrize("kwargs, message", [
    (dict(problem="nope", runs=3), "unknown problem"),
    (dict(problem="digits_mlp", runs=0), "--runs must be positive"),
    (dict(problem="digits_mlp", runs=3, data="mnist"), "takes data from"),
    (dict(problem="digits_mlp", runs=3, checkpoints=1), "at least 2"),
])
def test_bad_config_is_refused(kwargs, message):
    with pytest.raises(sweep.SweepConfigError, match=message):
        sweep.SweepConfig(**kwargs)


@pytest.mark.parametrize("spacing", ["linear", "log"])
@pytest.mark.parametrize("problem, n_train, steps", [("digits_mlp", 1400, 12), ("cartpole", None, 4)])
def test_too_many_checkpoints_refused(spacing, problem, n_train, steps):
    """Never more checkpoints than a run has steps (log spacing's early steps 1 apart used to run past the
    end: a 3-iteration CartPole run asked for 40 checkpoints crashed after its first shard had started)."""
    config = sweep.SweepConfig(problem=problem, runs=1, epochs=1 if n_train else 3, checkpoints=40, checkpoint_spacing=spacing)
    with pytest.raises(sweep.SweepConfigError, match=f"more than the {steps} steps"):
        sweep_config.checkpoint_steps(config, n_train)


@pytest.mark.parametrize("spacing", ["linear", "log"])
def test_shared_data_order_equals_plain_training(spacing):
    """One shuffle per epoch for the whole sweep (the first layers of all networks as one matmul) is still
    torch.optim.SGD per network, and a run's checkpoints do not depend on the shard it is trained in."""
    config = sweep.SweepConfig(problem="mnist_mlp", runs=3, epochs=2, checkpoints=6, data_order="shared",
                               checkpoint_spacing=spacing)
    dataset = data.load(config.data)
    result = sweep.train_runs(config, range(3), dataset)
    for k in range(3):
        for c, plain in enumerate(train_alone(config, k, dataset)):
            np.testing.assert_allclose(result.params[k, c], plain.numpy(), atol=2e-5, rtol=1e-4)
    alone = sweep.train_runs(config, [2], dataset)
    np.testing.assert_allclose(alone.params[0], result.params[2], atol=1e-6)


def test_log_spacing_is_dense_early_and_ends_at_the_last_step():
    config = sweep.SweepConfig(problem="mnist_mlp", runs=1, epochs=25, checkpoints=20, checkpoint_spacing="log")
    steps = sweep_config.checkpoint_steps(config, 4000)
    assert steps[0] == 0 and steps[-1] == 25 * 32 and len(steps) == 20
    assert list(steps[:5]) == [0, 1, 2, 3, 4] and np.all(np.diff(steps) > 0)
    assert np.all(np.diff(steps)[1:] >= np.diff(steps)[:-1])  # gaps only grow


def test_new_recipe_settings_leave_old_configs_unchanged():
    """Sweeps frozen before data_order and checkpoint_spacing existed must still match (and resume)."""
    old = sweep.SweepConfig(problem="digits_mlp", runs=2).to_dict()
    assert "data_order" not in old and "checkpoint_spacing" not in old
    new = sweep.SweepConfig(problem="digits_mlp", runs=2, data_order="shared", checkpoint_spacing="log").to_dict()
    assert new["data_order"] == "shared" and new["checkpoint_spacing"] == "log"
    assert sweep.SweepConfig(**new).to_dict() == new
    with pytest.raises(sweep.SweepConfigError, match="data order"):
        sweep.SweepConfig(problem="digits_mlp", runs=2, data_order="random")
    with pytest.raises(sweep.SweepConfigError, match="augments"):
        sweep.train_runs(sweep.SweepConfig(problem="cifar_cnn", runs=1, epochs=1, checkpoints=2, data_order="shared"),
                         [0], data.Dataset(torch.zeros(4, 3072), torch.zeros(4, dtype=torch.long),
                                           torch.zeros(4, 3072), torch.zeros(4, dtype=torch.long)))
