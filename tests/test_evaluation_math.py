"""Evaluation maths: prompts, prompt-alignment R^2, Pearson, batched prompting and recursion."""

import numpy as np
import pytest
import torch

from gptpipe import data, evaluation, gpt, problems
from gptpipe.diffusion import Diffusion

DIGITS = problems.get("digits_mlp")


def test_r2_hand_computed():
    requested = [[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]]
    achieved = [[1.0, 2.0, 4.0], [2.0, 2.0, 2.0]]
    # network 1: 1 - 1/2 = 0.5; network 2: 1 - (1 + 0 + 1)/2 = 0; mean 0.25
    assert evaluation.prompt_alignment_r2(requested, achieved) == pytest.approx(0.25)
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
