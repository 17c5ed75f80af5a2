"""Evaluation maths: prompts, prompt-alignment R^2, Pearson, batched prompting and recursion."""

import numpy as np
import pytest
import torch

from gptpipe import data, problems
from gptpipe.evaluation import sampling as evaluation
from gptpipe.gpt import model as gpt
from gptpipe.gpt.diffusion import Diffusion

DIGITS = problems.get("digits_mlp")


def test_r2_hand_computed():
    requested = [[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]]
    achieved = [[1.0, 2.0, 4.0], [2.0, 2.0, 2.0]]
    # network 1: 1 - 1/2 = 0.5; network 2: 1 - (1 + 0 + 1)/2 = 0; mean 0.25
    assert evaluation.prompt_alignment_r2(requested, achieved) == pytest.approx(0.25)
    np.testing.assert_allclose(evaluation.network_r2(requested, achieved), [0.5, 0.0])
    assert evaluation.prompt_alignment_r2(requested, requested) == 1.0
    # an answer that ignores the prompt and always gives the mean request scores 0
    assert evaluation.prompt_alignment_r2([[1.0, 3.0]], [[2.0, 2.0]]) == pytest.approx(0.0)


def test_pearson():
    assert evaluation.pearson([1, 2, 3, 4], [2, 4, 6, 8]) == pytest.approx(1.0)
    assert evaluation.pearson([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert np.isnan(evaluation.pearson([1, 2, 3], [5, 5, 5]))


def test_prompts_span_best_to_0p9_start():
    p = evaluation.prompts(0.3, [2.0, 1.0], 5)
    assert p.shape == (2, 5)
    torch.testing.assert_close(p[:, 0], torch.tensor([0.3, 0.3]))
    torch.testing.assert_close(p[:, -1], torch.tensor([1.8, 0.9]))
    torch.testing.assert_close(p[0], torch.linspace(0.3, 1.8, 5))


@pytest.fixture(scope="module")
def untrained():
    layers = [[layer.name, list(layer.shape)] for layer in DIGITS.layers]
    model = gpt.Gpt(gpt.GptConfig(layers=layers, width=32, depth=1, heads=2, num_frequencies=8, target="delta")).eval()
    return model, Diffusion(1000)


def test_prompt_networks_with_untrained_model(untrained):
    """An untrained G.pt returns its start: every prompt achieves the start metric."""
    model, diffusion = untrained
    ds = data.load("digits")
    starts = DIGITS.init([torch.Generator().manual_seed(s) for s in range(3)])
    r = evaluation.prompt_networks(model, diffusion, DIGITS, ds, starts, best=0.3, n_prompts=4,
                                   generator=torch.Generator().manual_seed(0))
    assert r.requested.shape == (3, 4) and r.params.shape == (3, 4, DIGITS.n_params)
    np.testing.assert_allclose(r.achieved["test_loss"], np.repeat(r.start_metric[:, None], 4, 1), rtol=1e-5)
    assert r.r2 == pytest.approx(evaluation.prompt_alignment_r2(r.requested, r.achieved["test_loss"]))
    rec = evaluation.recursive_prompting(model, diffusion, DIGITS, ds, starts, target=[0.3] * 3, k=2)
    assert rec["params"].shape == (2, 3, DIGITS.n_params) and rec["test_error"].shape == (2, 3)
    np.testing.assert_allclose(rec["test_loss"][-1], rec["start"], rtol=1e-5)


def test_sample_is_batched_consistently(untrained):
    model, diffusion = untrained
    start = torch.randn(10, DIGITS.n_params)
    m = torch.full((10,), 2.0)
    a = evaluation.sample(model, diffusion, start, m, m - 1, "ddim", 1, torch.Generator().manual_seed(0), batch_size=3)
    b = evaluation.sample(model, diffusion, start, m, m - 1, "ddim", 1, torch.Generator().manual_seed(0), batch_size=100)
    torch.testing.assert_close(a, start) and torch.testing.assert_close(b, start)


@pytest.fixture(scope="module")
def random_denoiser():
    """A G.pt whose output depends on its input noise (the decoder is not zero)."""
    layers = [[layer.name, list(layer.shape)] for layer in DIGITS.layers]
    torch.manual_seed(0)
    model = gpt.Gpt(gpt.GptConfig(layers=layers, width=32, depth=1, heads=2, num_frequencies=8, target="delta")).eval()
    with torch.no_grad():
        model.decode.weight.normal_(0, 0.05)
    return model, Diffusion(1000)


def test_sample_with_explicit_noise_is_deterministic(random_denoiser):
    model, diffusion = random_denoiser
    start, m = torch.randn(4, DIGITS.n_params), torch.full((4,), 2.0)
    x_T = torch.randn(4, DIGITS.n_params, generator=torch.Generator().manual_seed(1))
    a = evaluation.sample(model, diffusion, start, m, m - 1, "ddim", 5, torch.Generator().manual_seed(2), x_T=x_T, batch_size=3)
    b = evaluation.sample(model, diffusion, start, m, m - 1, "ddim", 5, torch.Generator().manual_seed(3), x_T=x_T)
    c = evaluation.sample(model, diffusion, start, m, m - 1, "ddim", 5, torch.Generator().manual_seed(3))
    torch.testing.assert_close(a, b)
    assert not torch.allclose(b, c)
    with pytest.raises(ValueError):
        evaluation.sample(model, diffusion, start, m, m - 1, "ddim", 5, x_T=x_T[:2])


def test_temperature_scales_the_starting_noise(random_denoiser):
    model, diffusion = random_denoiser
    start, m = torch.randn(4, DIGITS.n_params), torch.full((4,), 2.0)
    cool = evaluation.sample(model, diffusion, start, m, m - 1, "ddim", 5, torch.Generator().manual_seed(3), temperature=0.5)
    x_T = 0.5 * torch.randn(4, DIGITS.n_params, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(cool, evaluation.sample(model, diffusion, start, m, m - 1, "ddim", 5, x_T=x_T))
    assert not torch.allclose(cool, evaluation.sample(model, diffusion, start, m, m - 1, "ddim", 5, torch.Generator().manual_seed(3)))
    for bad in (dict(sampler="mean", temperature=0.5), dict(temperature=0.0), dict(temperature=0.5, x_T=x_T)):
        with pytest.raises(ValueError):
            evaluation.sample(model, diffusion, start, m, m - 1, **{"steps": 2, **bad})


def test_slerp_and_latent_walk(random_denoiser):
    model, diffusion = random_denoiser
    z0, z1 = torch.randn(760), torch.randn(760)
    path = evaluation.slerp(z0, z1, torch.linspace(0, 1, 5))
    torch.testing.assert_close(path[0], z0) and torch.testing.assert_close(path[-1], z1)
    assert path.norm(dim=1).min() > 0.9 * min(z0.norm(), z1.norm())  # no shortcut through the middle
    start = DIGITS.init([torch.Generator().manual_seed(0)])[0]
    frames, noise = evaluation.latent_walk(model, diffusion, start, 2.0, 0.5, 6, torch.Generator().manual_seed(4), steps=3)
    again, _ = evaluation.latent_walk(model, diffusion, start, 2.0, 0.5, 6, torch.Generator().manual_seed(4), steps=3)
    assert frames.shape == (6, DIGITS.n_params) and torch.equal(frames, again)
    # the ends are plain deterministic samples from the two noises; the path moves gradually
    end = evaluation.sample(model, diffusion, start[None], [2.0], [0.5], "ddim", 3, x_T=noise[-1:])
    torch.testing.assert_close(frames[-1:], end)
    steps = (frames[1:] - frames[:-1]).norm(dim=1)
    assert steps.max() < (frames[-1] - frames[0]).norm()


def test_first_layer_images_and_walk_plot():
    from gptpipe.evaluation import report

    theta = torch.randn(3, DIGITS.n_params).numpy()
    images = report.first_layer_images(DIGITS.layers, theta)
    assert images.shape == (3, 10, 8, 8)
    np.testing.assert_array_equal(images[1, 2].ravel(), theta[1, 2 * 64 : 3 * 64])  # unit 2's incoming weights
    mnist = problems.get("mnist_mlp")
    assert report.first_layer_images(mnist.layers, np.zeros((2, mnist.n_params))).shape == (2, 10, 28, 28)
    cifar = problems.get("cifar_cnn")
    assert report.first_layer_images(cifar.layers, np.zeros((2, cifar.n_params))).shape == (2, 16, 3, 3, 3)
    assert report.first_layer_images([["w", [32, 4]]], np.zeros((2, 128))) is None  # a policy's 4 inputs: not an image
    png = report.latent_walk_plot(images, np.array([0.5, 0.4, 0.3]), "test_loss")
    assert png[:4] == b"\x89PNG"


def test_best_run_lr_breaks_ties_the_same_way_every_time(tmp_path):
    """Many CartPole runs reach the top return 500: the recipe baseline's learning rate must not depend on
    the order DuckDB happens to read them in."""
    import pyarrow as pa

    from gptpipe.stages.evaluate import best_run_lr
    from storage import catalog
    from storage.store import open_store

    store = open_store(str(tmp_path / "store"), create=True)
    rows = {"run": [0, 1, 2, 3, 4], "status": ["ok", "ok", "ok", "ok", "diverged"], "lr": [0.1, 0.2, 0.3, 0.4, 0.5],
            "best_return": [500.0, 500.0, 480.0, 500.0, 500.0], "final_return": [450.0, 500.0, 480.0, 500.0, 500.0]}
    for shard, idx in enumerate(([3, 4], [0, 1, 2])):  # the tied runs sit in different files
        catalog.write_shard(store, "runs", "s", shard, pa.table({k: [v[i] for i in idx] for k, v in rows.items()}))
    assert best_run_lr(store, "s", "return", higher_is_better=True) == 0.2  # 500 at the end, lowest run number
    assert best_run_lr(store, "s", "return", higher_is_better=False) == 0.3


def test_start_networks_pass_over_inits_already_near_the_best():
    """Fresh inits within 10% of the best value have nothing to be asked for and are redrawn; where no
    init has room at all the first draws are taken as they are."""
    from types import SimpleNamespace

    from gptpipe.stages.evaluate import has_room, start_networks

    ds = data.load("digits")
    first = DIGITS.init([torch.Generator().manual_seed(10_000_019 + i) for i in range(8)])
    losses = DIGITS.score(first, ds)["test_loss"].double().numpy()
    best = float(np.median(losses)) / 1.1  # about half of the inits are within 10% of it
    s = SimpleNamespace(problem=DIGITS, dataset=ds, metric="test_loss", best=best, lineage={"heldout_runs": {}})
    starts, sources = start_networks(None, s, 8, seed=0)
    assert sources == ["fresh_init"] * 8 and starts.shape == (8, DIGITS.n_params)
    scored = DIGITS.score(torch.from_numpy(starts), ds)["test_loss"].double().numpy()
    assert has_room(s, scored).all() and not has_room(s, losses).all()
    np.testing.assert_array_equal(starts[: has_room(s, losses).sum()], first.numpy()[has_room(s, losses)])  # in draw order
    s.best = 100.0  # a loss nothing is worse than: no init has room
    starts, _ = start_networks(None, s, 8, seed=0)
    np.testing.assert_array_equal(starts, first.numpy())


def test_at_level_picks_each_runs_checkpoint_closest_to_the_level():
    from gptpipe.stages.evaluate import at_level

    blocks = np.arange(2 * 4 * 3, dtype=float).reshape(2, 4, 3)  # 2 runs, 4 checkpoints, 3 parameters
    values = np.array([[2.3, 1.0, 0.6, 0.4], [2.3, 0.9, np.nan, 0.3]])  # a checkpoint the catalog lacks is skipped
    np.testing.assert_array_equal(at_level(blocks, values, 0.55), blocks[[0, 1], [2, 3]])
    np.testing.assert_array_equal(at_level(blocks, values, 5.0), blocks[:, 0])


def test_paired_ratio_and_its_standard_error():
    from gptpipe.evaluation.baselines import paired_ratio

    rng = np.random.default_rng(0)
    hardness = rng.gamma(2.0, 0.05, size=4000)  # some inits are hard for both G.pt and the recipe
    recipe = 0.08 + hardness
    gpt = 1.5 * recipe + rng.normal(0, 0.01, size=4000)
    ratio, se = paired_ratio(gpt, recipe)
    assert ratio == pytest.approx(gpt.mean() / recipe.mean())
    # the standard error is that of the ratio over draws of 64 start networks (checked by drawing them)
    draws = [paired_ratio(gpt[i], recipe[i])[0] for i in rng.integers(0, 4000, size=(2000, 64))]
    _, se64 = paired_ratio(gpt[:64], recipe[:64])
    assert se64 == pytest.approx(np.std(draws), rel=0.25)
    # pairing is what keeps it small: the same values taken as two independent samples give far more
    g, b = gpt[:64], recipe[:64]
    unpaired = np.sqrt(g.var(ddof=1) + (g.mean() / b.mean()) ** 2 * b.var(ddof=1)) / np.sqrt(64) / b.mean()
    assert se64 < 0.5 * unpaired
    # exactly proportional: no uncertainty; a recipe mean of 0: no ratio
    assert paired_ratio(2 * recipe[:10], recipe[:10]) == pytest.approx((2.0, 0.0), abs=1e-12)
    assert np.isnan(paired_ratio([0.1, 0.2], [0.0, 0.0])[0])
