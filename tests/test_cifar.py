"""The CIFAR-10 CNN: its data format, batched training against plain PyTorch (augmentation included),
its metrics and its permutation symmetry."""

import math
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gptpipe import data, problems, sweep
from gptpipe.sweep import config as sweep_config


def write_cifar(root, n_train_per_batch: int = 8, n_test: int = 12, seed: int = 0) -> None:
    """Files in torchvision's CIFAR-10 layout (not the official bytes): ROOT/cifar-10-batches-py/."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        n = n_test if name == "test_batch" else n_train_per_batch
        batch = {b"batch_label": name.encode(), b"data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
                 b"labels": rng.integers(0, 10, size=n).tolist(), b"filenames": [b"x.png"] * n}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)


@pytest.fixture
def cifar_root(tmp_path):
    write_cifar(tmp_path)
    return str(tmp_path)


def test_reader_accepts_any_files_in_the_layout(cifar_root, tmp_path):
    d = data.load("cifar10", cifar_root)
    assert d.x_train.shape == (40, 3072) and d.x_test.shape == (12, 3072)
    with open(tmp_path / "cifar-10-batches-py" / "data_batch_2", "rb") as f:
        batch = pickle.load(f)
    raw = batch[b"data"][3].astype(np.float32).reshape(3, 1024) / 255.0
    mean, std = np.array([0.4914, 0.4822, 0.4465])[:, None], np.array([0.2470, 0.2435, 0.2616])[:, None]
    np.testing.assert_allclose(d.x_train[8 + 3].numpy(), ((raw - mean) / std).reshape(-1), rtol=1e-5, atol=1e-5)
    assert d.y_train[8 + 3].item() == batch[b"labels"][3]


def test_reader_errors_are_one_line(tmp_path):
    with pytest.raises(data.DataError, match="needs --data-root"):
        data.load("cifar10")
    write_cifar(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "test_batch").unlink()
    with pytest.raises(data.DataError, match="test_batch is missing"):
        data.load("cifar10", str(tmp_path))


class _RunsCode:
    """A pickle that would run a shell command when loaded."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


def test_a_batch_that_would_run_code_is_refused_unrun(tmp_path):
    write_cifar(tmp_path)
    marker = tmp_path / "ran"
    with open(tmp_path / "cifar-10-batches-py" / "data_batch_3", "wb") as f:
        pickle.dump({b"data": _RunsCode(marker), b"labels": []}, f)
    with pytest.raises(data.DataError, match=r"data_batch_3 is not a CIFAR-10 batch \(UnpicklingError: (posix|os|nt)\.system") as e:
        data.load("cifar10", str(tmp_path))
    assert "\n" not in str(e.value) and not marker.exists()


def test_layout_matches_the_module():
    problem = problems.get("cifar_cnn")
    assert problem.n_params == 5370
    module = problem.module()
    assert [(k, tuple(v.shape)) for k, v in module.state_dict().items()] == [(l.name, l.shape) for l in problem.layers]
    assert sweep.SweepConfig(problem="cifar_cnn", runs=1).epochs == 50  # the problem's own recipe
    assert sweep.SweepConfig(problem="cifar_cnn", runs=1, epochs=3).epochs == 3
    assert sweep.SweepConfig(problem="digits_mlp", runs=1).epochs == 25


def augment_one(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """The documented augmentation, one image at a time: pad 4, crop at (dy, dx), flip."""
    B = len(x)
    flip = torch.rand(B, generator=g) < 0.5
    dy, dx = torch.randint(0, 9, (2, B), generator=g)
    out = []
    for i in range(B):
        img = F.pad(x[i].view(3, 32, 32), (4, 4, 4, 4))[:, dy[i] : dy[i] + 32, dx[i] : dx[i] + 32]
        out.append((img.flip(-1) if flip[i] else img).reshape(-1))
    return torch.stack(out)


def train_alone(config, run, dataset):
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
    for _ in range(config.epochs):
        order = torch.randperm(len(dataset.x_train), generator=g)
        for b in range(per_epoch):
            idx = order[b * config.batch_size : (b + 1) * config.batch_size]
            x = augment_one(dataset.x_train[idx], g)
            loss = F.cross_entropy(model(x.view(-1, 3, 32, 32)), dataset.y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            if step in ckpt_steps:
                out.append(flat())
    return out


def test_batched_equals_plain_training_with_augmentation(cifar_root):
    dataset = data.load("cifar10", cifar_root)
    config = sweep.SweepConfig(problem="cifar_cnn", runs=3, data="cifar10", epochs=2, batch_size=16, checkpoints=4)
    result = sweep.train_runs(config, range(3), dataset)
    assert result.params.shape == (3, 4, 5370)
    for k in range(3):
        plain = train_alone(config, k, dataset)
        assert len(plain) == 4
        for c in range(4):
            np.testing.assert_allclose(result.params[k, c], plain[c].numpy(), atol=2e-5, rtol=1e-4)
    assert not np.allclose(result.params[0, -1], result.params[1, -1])
    # the metrics are the module's on the un-augmented split
    problem = problems.get("cifar_cnn")
    model = problem.module()
    model.load_state_dict(problem.state_dict(torch.from_numpy(result.params[2, -1])))
    with torch.no_grad():
        logits = model(dataset.x_test.view(-1, 3, 32, 32))
    assert result.metrics["test_loss"][2, -1] == pytest.approx(F.cross_entropy(logits, dataset.y_test).item(), rel=1e-5)
    assert result.metrics["test_error"][2, -1] == pytest.approx((logits.argmax(1) != dataset.y_test).float().mean().item())


def test_evaluate_chunks_agree():
    problem = problems.get("cifar_cnn")
    theta = problem.init([torch.Generator().manual_seed(i) for i in range(5)])
    x, y = torch.randn(37, 3072), torch.randint(0, 10, (37,))
    whole = problem.evaluate(theta, x, y)
    parts = problem.evaluate(theta, x, y, chunk=2, budget=2 * 32 * 256 * 5)  # 2 networks x 5 images per chunk
    torch.testing.assert_close(whole["loss"], parts["loss"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(whole["error"], parts["error"])


def test_permutation_preserves_the_function():
    problem = problems.get("cifar_cnn")
    g = torch.Generator().manual_seed(0)
    theta = problem.init([torch.Generator().manual_seed(i) for i in range(4)])
    perm = problem.sample_permutation(4, g)
    assert perm.shape == (4, 48)
    permuted = problem.permute(theta, perm=perm)
    assert not torch.allclose(permuted, theta)
    x = torch.randn(4, 9, 3072)
    torch.testing.assert_close(problem.logits(permuted, x), problem.logits(theta, x), rtol=1e-4, atol=1e-5)
    # the same perm permutes jointly; without one each network gets its own shuffle
    torch.testing.assert_close(problem.permute(theta, perm=perm), permuted)
    other = problem.permute(theta, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(problem.logits(other, x), problem.logits(theta, x), rtol=1e-4, atol=1e-5)
