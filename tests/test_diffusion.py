"""The DDPM forward process and the samplers agree: a perfect x0 predictor recovers x0."""

import pytest
import torch

from gptpipe.gpt.diffusion import Diffusion


@pytest.fixture(scope="module")
def diffusion():
    return Diffusion(1000)


def test_schedule(diffusion):
    assert diffusion.betas[0].item() == pytest.approx(1e-4) and diffusion.betas[-1].item() == pytest.approx(0.02)
    assert diffusion.alpha_bar[-1].item() < 1e-4  # x_T is (almost) pure noise


def test_forward_process_moments(diffusion):
    g = torch.Generator().manual_seed(0)
    x0 = torch.full((20000, 4), 1.5)
    for t in (0, 100, 500, 999):
        tt = torch.full((20000,), t)
        xt = diffusion.q_sample(x0, tt, torch.randn(x0.shape, generator=g))
        ab = diffusion.alpha_bar[t].item()
        assert xt.mean().item() == pytest.approx(1.5 * ab**0.5, abs=0.02)
        assert xt.var().item() == pytest.approx(1 - ab, abs=0.02 + 0.02 * (1 - ab))


def perfect(x0):
    return lambda x_t, t: x0.expand_as(x_t)


@pytest.mark.parametrize("sampler,steps", [("ddpm", None), ("ddpm", 50), ("ddim", 1), ("ddim", 10), ("ddim", 1000), ("mean", 4)])
def test_perfect_denoiser_recovers_x0(diffusion, sampler, steps):
    x0 = torch.randn(3, 7, generator=torch.Generator().manual_seed(1))
    out = diffusion.sample(perfect(x0), x0.shape, sampler, steps, torch.Generator().manual_seed(2))
    torch.testing.assert_close(out, x0)


def test_ancestral_step_matches_forward_marginal(diffusion):
    """x_t ~ q(x_t|x0), then one ancestral step with the true x0 gives x_{t-1} ~ q(x_{t-1}|x0)."""
    g = torch.Generator().manual_seed(3)
    n, t = 40000, 300
    x0 = torch.full((n, 1), 0.7)
    x_T = diffusion.q_sample(x0, torch.full((n,), t), torch.randn(n, 1, generator=g))
    seen = []

    def denoise(x_t, tt):
        seen.append(int(tt[0]))
        return x0

    # the respaced chain 999 ... with steps=T visits every t; start it at t by driving it by hand
    ab, ab_prev = diffusion.alpha_bar[t].item(), diffusion.alpha_bar[t - 1].item()
    beta = 1 - ab / ab_prev
    c0 = ab_prev**0.5 * beta / (1 - ab)
    ct = (1 - beta) ** 0.5 * (1 - ab_prev) / (1 - ab)
    var = beta * (1 - ab_prev) / (1 - ab)
    x_prev = c0 * x0 + ct * x_T + var**0.5 * torch.randn(n, 1, generator=g)
    assert x_prev.mean().item() == pytest.approx(0.7 * ab_prev**0.5, abs=0.01)
    assert x_prev.var().item() == pytest.approx(1 - ab_prev, rel=0.03)
    # and the sampler uses exactly these coefficients: a 2-step chain over (t, t-1) reproduces them
    d2 = Diffusion(1000)
    d2.spaced = lambda steps: [t, t - 1]
    g1, g2 = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    out = d2.ddpm(denoise, (n, 1), 2, g1, x_T=x_T)
    assert seen == [t, t - 1]
    torch.testing.assert_close(out, x0.expand(n, 1))


def test_ddim_step_keeps_the_noise(diffusion):
    """Deterministic DDIM with the true x0 moves x_t along its own noise: x_s = sqrt(ab_s) x0 + sqrt(1-ab_s) eps."""
    g = torch.Generator().manual_seed(4)
    x0, eps = torch.randn(5, 3, generator=g), torch.randn(5, 3, generator=g)
    d = Diffusion(1000)
    d.spaced = lambda steps: [999, 600, 0]
    seen = {}

    def denoise(x_t, tt):
        seen[int(tt[0])] = x_t.clone()
        return x0

    d.ddim(denoise, x0.shape, 3, x_T=d.q_sample(x0, torch.full((5,), 999), eps))
    torch.testing.assert_close(seen[600], d.q_sample(x0, torch.full((5,), 600), eps))


def test_training_loss_and_timesteps(diffusion):
    g = torch.Generator().manual_seed(5)
    x0 = torch.randn(8, 6, generator=g)
    t = diffusion.sample_t(8, g)
    assert diffusion.loss(perfect(x0), x0, t, torch.randn(8, 6, generator=g)).abs().max().item() == 0
    high = diffusion.sample_t(10000, g, high_frac=1.0)
    assert high.min().item() >= 900 and high.max().item() <= 999
    mixed = diffusion.sample_t(10000, g, high_frac=0.5)
    assert 0.5 < (mixed >= 900).float().mean().item() < 0.6


def test_unknown_sampler(diffusion):
    with pytest.raises(ValueError):
        diffusion.sample(perfect(torch.zeros(1, 1)), (1, 1), "euler")
