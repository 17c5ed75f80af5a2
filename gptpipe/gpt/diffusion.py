"""Gaussian diffusion (DDPM) over flat vectors, with x0-prediction and three samplers.

Forward process: ``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps`` with ``abar_t = prod_{s<=t} (1 - beta_s)``
and betas linear in [1e-4, 0.02] over 1,000 steps (t = 0 .. 999). The model is a *denoiser*
``denoise(x_t, t) -> x0_hat``; its training loss is the mean squared error to the clean x0.

Samplers (all batched: ``shape = [N, P]`` holds N independent (network, prompt) problems):

- ``ddpm``: ancestral sampling, ``x_{t-1} ~ q(x_{t-1} | x_t, x0_hat)`` (the paper's sampler). With
  ``steps < timesteps`` the chain is respaced to an evenly spaced subsequence (same marginals).
- ``ddim``: the deterministic DDIM update (eta = 0) on an evenly spaced subsequence of ``steps``
  timesteps. ``steps=1`` is the one-step posterior mean: ``x0_hat(x_T, T-1)``, the model's estimate of
  E[x0 | condition], because x_T carries almost no information about x0.
- ``mean``: that one-step estimate averaged over ``n_mean`` noise draws (a lower-variance mean).

``x_T`` (``ddim``, ``ddpm``): an explicit starting noise ``[N, P]`` instead of a fresh draw. DDIM is then a
deterministic function of ``x_T`` (used by ``evaluation.latent_walk``).
"""

from __future__ import annotations

from typing import Callable

import torch

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x_t [N, P], t [N]) -> x0_hat [N, P]
SAMPLERS = ("ddpm", "ddim", "mean")


class Diffusion:
    """The DDPM noise schedule, the training loss and the samplers (x0-prediction)."""

    def __init__(self, timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02):
        self.timesteps = timesteps
        self.betas = torch.linspace(beta_start, beta_end, timesteps, dtype=torch.float64)
        self.alpha_bar = torch.cumprod(1.0 - self.betas, dim=0)  # float64 [T]

    # --- training -----------------------------------------------------------------------------
    def _coef(self, values: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return values.to(like.device)[t.to(like.device)].to(like.dtype).unsqueeze(-1)

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Draw ``x_t ~ q(x_t | x0)`` given the standard normal ``noise``."""
        ab = self._coef(self.alpha_bar, t, x0)
        return ab.sqrt() * x0 + (1.0 - ab).sqrt() * noise

    def sample_t(self, n: int, generator: torch.Generator | None = None, high_frac: float = 0.0) -> torch.Tensor:
        """Training timesteps: uniform over 0..T-1, except that a fraction ``high_frac`` is drawn from
        the top tenth of the schedule (where the few-step samplers do their work)."""
        device = generator.device if generator is not None else None  # drawn where the generator lives
        t = torch.randint(0, self.timesteps, (n,), generator=generator, device=device)
        if high_frac > 0:
            high = torch.rand(n, generator=generator, device=device) < high_frac
            top = torch.randint(int(0.9 * self.timesteps), self.timesteps, (n,), generator=generator, device=device)
            t = torch.where(high, top, t)
        return t

    def loss(self, denoise: Denoiser, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Per-example mean squared error of the x0 prediction, ``[N]``."""
        x0_hat = denoise(self.q_sample(x0, t, noise), t)
        return (x0_hat.float() - x0.float()).pow(2).mean(dim=1)

    # --- sampling -----------------------------------------------------------------------------
    def spaced(self, steps: int) -> list[int]:
        """``steps`` timesteps evenly spaced over the schedule, last (T-1) first."""
        steps = max(1, min(int(steps), self.timesteps))
        ts = torch.linspace(self.timesteps - 1, 0, steps).round().long().tolist()
        return sorted(set(ts), reverse=True)

    def _noise(self, shape, generator, device, dtype=torch.float32) -> torch.Tensor:
        return torch.randn(shape, generator=generator, dtype=dtype).to(device)

    @torch.no_grad()
    def ddim(self, denoise: Denoiser, shape, steps: int = 1, generator=None, device="cpu", x_T=None) -> torch.Tensor:
        x = self._noise(shape, generator, device) if x_T is None else x_T.to(device, torch.float32)
        ts = self.spaced(steps)
        for k, t in enumerate(ts):
            tt = torch.full((shape[0],), t, dtype=torch.long, device=device)
            x0 = denoise(x, tt).float()
            if k == len(ts) - 1:
                return x0
            ab, ab_prev = float(self.alpha_bar[t]), float(self.alpha_bar[ts[k + 1]])
            eps = (x - ab**0.5 * x0) / (1.0 - ab) ** 0.5
            x = ab_prev**0.5 * x0 + (1.0 - ab_prev) ** 0.5 * eps
        return x

    @torch.no_grad()
    def ddpm(self, denoise: Denoiser, shape, steps: int | None = None, generator=None, device="cpu", x_T=None) -> torch.Tensor:
        """Ancestral sampling; ``steps=None`` runs all ``timesteps`` steps."""
        x = self._noise(shape, generator, device) if x_T is None else x_T.to(device, torch.float32)
        ts = self.spaced(steps or self.timesteps)
        for k, t in enumerate(ts):
            tt = torch.full((shape[0],), t, dtype=torch.long, device=device)
            x0 = denoise(x, tt).float()
            if k == len(ts) - 1:
                return x0  # the posterior at t -> "-1" is a point mass on x0_hat
            ab, ab_prev = float(self.alpha_bar[t]), float(self.alpha_bar[ts[k + 1]])
            beta = 1.0 - ab / ab_prev  # the respaced chain's beta for this step
            # q(x_prev | x_t, x0) = N(c0 x0 + ct x_t, var)
            c0 = ab_prev**0.5 * beta / (1.0 - ab)
            ct = (1.0 - beta) ** 0.5 * (1.0 - ab_prev) / (1.0 - ab)
            var = beta * (1.0 - ab_prev) / (1.0 - ab)
            x = c0 * x0 + ct * x + var**0.5 * self._noise(shape, generator, device)
        return x

    @torch.no_grad()
    def mean(self, denoise: Denoiser, shape, n_mean: int = 8, generator=None, device="cpu") -> torch.Tensor:
        total = 0.0
        for _ in range(n_mean):
            total = total + self.ddim(denoise, shape, 1, generator, device)
        return total / n_mean

    def sample(self, denoise: Denoiser, shape, sampler: str = "ddim", steps: int | None = 1, generator=None, device="cpu",
               x_T: torch.Tensor | None = None) -> torch.Tensor:
        if x_T is not None and tuple(x_T.shape) != tuple(shape):
            raise ValueError(f"x_T has shape {tuple(x_T.shape)}, expected {tuple(shape)}")
        if sampler == "ddim":
            return self.ddim(denoise, shape, steps or 1, generator, device, x_T=x_T)
        if sampler == "ddpm":
            return self.ddpm(denoise, shape, steps, generator, device, x_T=x_T)
        if x_T is not None:
            raise ValueError("the 'mean' sampler averages over many noises; x_T needs 'ddim' or 'ddpm'")
        if sampler == "mean":
            return self.mean(denoise, shape, steps or 8, generator, device)
        raise ValueError(f"unknown sampler {sampler!r} (choose from {', '.join(SAMPLERS)})")
