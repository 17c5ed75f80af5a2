"""Evaluation maths for G.pt (no I/O): prompts, batched sampling, prompt alignment, recursive prompting,
fitting a calibration.

Protocol (the paper's, as its MNIST configurations set it): start from parameters G.pt has not trained
on (held-out runs' initial checkpoints, fresh random inits); ask each for ``P`` metric values evenly
spaced from the best value seen in the sweep to 0.9 x its own starting metric; sample parameters; measure
what they achieve with the problem's own ``score``. Prompt alignment is the R^2 of achieved against
requested, computed per network and averaged over networks. (The paper's CartPole and CIFAR-10
configurations end the range at the start value itself; on CartPole that measured the same within 0.03,
docs/gpt-ablations.md, so every problem here keeps one protocol.)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from gptpipe import problems
from gptpipe.evaluation import calibration
from gptpipe.gpt.diffusion import Diffusion
from gptpipe.gpt.model import Gpt, Normalizer


def prompts(best: float, start_metric, n_prompts: int, top_frac: float = 0.9) -> torch.Tensor:
    """``[N, n_prompts]``: for each network, values evenly spaced from ``best`` to ``top_frac x start``."""
    start = torch.as_tensor(np.asarray(start_metric), dtype=torch.float32).reshape(-1, 1)
    w = torch.linspace(0.0, 1.0, n_prompts).reshape(1, -1)
    return best + w * (top_frac * start - best)


def canonical_index(model: Gpt, start: torch.Tensor) -> torch.Tensor | None:
    """For a model trained on canonically ordered pairs (``GptConfig.canonical``): the flat index
    ``[N, P]`` with ``start.gather(1, index)`` = each start in its canonical unit order; None for other
    models. ``torch.empty_like(x).scatter_(1, index, x)`` puts generated parameters back in the start's
    own order (the same function either way; the caller gets the order it gave)."""
    if not model.config.canonical:
        return None
    problem = problems.get(model.config.canonical)
    positions = torch.arange(start.shape[1], dtype=torch.float64).expand(len(start), -1)
    return problem.permute(positions, perm=problem.canonical_permutation(start)).long()


@torch.no_grad()
def sample(model: Gpt, diffusion: Diffusion, start_params, start_metric, target, sampler: str = "ddim", steps: int | None = 1,
           generator: torch.Generator | None = None, batch_size: int = 2048, x_T: torch.Tensor | None = None,
           guidance: float = 1.0, temperature: float = 1.0) -> torch.Tensor:
    """New parameters ``[N, P]`` (raw, de-normalised) for N (start, prompt) problems, in batches.

    ``start_params [N, P]`` raw parameters; ``start_metric [N]`` what they achieve; ``target [N]`` the
    requested metric. Sampler names and ``steps`` as in ``Diffusion.sample``. ``x_T [N, P]``: explicit
    initial noise (in the diffusion variable's normalised units) instead of drawing it from ``generator``.
    ``guidance``: the classifier-free guidance scale (``Gpt.guided``; 1 = none). ``temperature``: the
    starting noise is drawn from N(0, temperature^2) (``ddim``, ``ddpm``; 1 = the model's own noise): below
    1 the samples keep closer to what G.pt finds most likely for the prompt."""
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    if temperature != 1.0 and (sampler == "mean" or x_T is not None):
        raise ValueError("temperature scales the starting noise G.pt draws for 'ddim' or 'ddpm'; "
                         "not for 'mean' or an explicit x_T")
    device = next(model.parameters()).device
    norm = Normalizer(model.config, device)
    start_params = torch.as_tensor(np.asarray(start_params), dtype=torch.float32)
    start_metric = torch.as_tensor(np.asarray(start_metric), dtype=torch.float32).reshape(-1)
    target = torch.as_tensor(np.asarray(target), dtype=torch.float32).reshape(-1)
    model.eval()
    order = canonical_index(model, start_params)
    if order is not None:
        start_params = start_params.gather(1, order)
    out = []
    for a in range(0, len(start_params), batch_size):
        s = norm.normalize(start_params[a : a + batch_size].to(device))
        m0, m1 = start_metric[a : a + batch_size].to(device), target[a : a + batch_size].to(device)
        denoise = lambda x_t, t: model.guided(x_t, s, t, m0, m1, guidance)
        noise = None if x_T is None else torch.as_tensor(x_T)[a : a + batch_size]
        if temperature != 1.0:  # the draw Diffusion would make, scaled
            noise = temperature * torch.randn(tuple(s.shape), generator=generator)
        x0 = diffusion.sample(denoise, tuple(s.shape), sampler, steps, generator, device, x_T=noise)
        out.append(norm.denormalize(norm.params(x0, s)).cpu())
    out = torch.cat(out)
    return out if order is None else torch.empty_like(out).scatter_(1, order, out)


def slerp(z0: torch.Tensor, z1: torch.Tensor, alphas: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation between two noise vectors ``[P]`` at ``alphas [F]`` -> ``[F, P]``: every
    point keeps the norm a Gaussian draw of that size has (a straight line would pass through
    unlikely, too-short noise)."""
    z0, z1 = z0.double(), z1.double()
    cos = torch.dot(z0, z1) / (z0.norm() * z1.norm())
    omega = torch.arccos(cos.clamp(-1.0, 1.0))
    a = alphas.double().reshape(-1, 1)
    if float(omega) < 1e-6:
        return ((1 - a) * z0 + a * z1).float()
    return ((torch.sin((1 - a) * omega) * z0 + torch.sin(a * omega) * z1) / torch.sin(omega)).float()


@torch.no_grad()
def latent_walk(model: Gpt, diffusion: Diffusion, start, start_metric: float, target: float, n_frames: int = 8,
                generator: torch.Generator | None = None, steps: int = 10, guidance: float = 1.0,
                temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Walk through G.pt's noise space for one (start, prompt): draw two noises, slerp between them in
    ``n_frames`` frames and sample each deterministically (DDIM, ``steps`` steps). Neighbouring frames
    differ only by a small move of the noise, so the frames show how the generated network changes
    continuously across the solutions G.pt offers for the same prompt.

    ``start [P]`` raw parameters. Returns ``(params [n_frames, P], noise [n_frames, P])``."""
    start = torch.as_tensor(np.asarray(start), dtype=torch.float32).reshape(1, -1)
    P = start.shape[1]
    z0 = torch.randn(P, generator=generator)
    z1 = torch.randn(P, generator=generator)
    noise = temperature * slerp(z0, z1, torch.linspace(0.0, 1.0, n_frames))
    theta = sample(model, diffusion, start.expand(n_frames, -1), torch.full((n_frames,), float(start_metric)),
                   torch.full((n_frames,), float(target)), "ddim", steps, generator, x_T=noise, guidance=guidance)
    return theta, noise


def prompt_alignment_r2(requested, achieved) -> float:
    """G.pt's prompt alignment: ``network_r2`` averaged over networks (the paper's figure)."""
    return float(np.mean(network_r2(requested, achieved)))


def network_r2(requested, achieved) -> np.ndarray:
    """``[N]``: for each network (row), ``1 - sum (req - ach)^2 / sum (req - mean req)^2`` over its prompts.
    1 is perfect; 0 is as good as always answering the mean request; it is unbounded below, so a mean
    over networks can be decided by a few (a CartPole policy starting at 440 is asked for 396-500, a
    span smaller than one sample's scatter: R² down to -40)."""
    req, ach = np.asarray(requested, dtype=np.float64), np.asarray(achieved, dtype=np.float64)
    req, ach = req.reshape(-1, req.shape[-1]), ach.reshape(-1, ach.shape[-1])
    ss_res = ((req - ach) ** 2).sum(1)
    ss_tot = ((req - req.mean(1, keepdims=True)) ** 2).sum(1)
    return 1.0 - ss_res / ss_tot


def pearson(requested, achieved) -> float:
    """Pearson correlation of all (requested, achieved) pairs pooled."""
    req, ach = np.asarray(requested, dtype=np.float64).ravel(), np.asarray(achieved, dtype=np.float64).ravel()
    ok = np.isfinite(req) & np.isfinite(ach)
    if ok.sum() < 2 or np.std(ach[ok]) == 0:
        return float("nan")
    return float(np.corrcoef(req[ok], ach[ok])[0, 1])


@dataclass
class PromptResult:
    """N start networks prompted with P values each: what was asked, what the samples achieve."""

    start_metric: np.ndarray  # [N]
    requested: np.ndarray  # [N, P] what was asked for
    prompted: np.ndarray  # [N, P] what G.pt was conditioned on (the request, or its calibrated prompt)
    achieved: dict  # every metric of the problem -> [N, P]
    params: np.ndarray  # [N, P, n_params] generated parameters
    metric: str
    r2: float
    pearson: float


def prompt_networks(model: Gpt, diffusion: Diffusion, problem, dataset, start_params, best: float, n_prompts: int = 20,
                    metric: str = "test_loss", sampler: str = "ddim", steps: int | None = 1,
                    generator: torch.Generator | None = None, top_frac: float = 0.9, condition=None,
                    guidance: float = 1.0, temperature: float = 1.0) -> PromptResult:
    """Prompt N starting networks with ``n_prompts`` values each and measure what the samples achieve.
    ``condition(start_metric [N], requested [N, P]) -> prompts [N, P]`` turns requests into what G.pt is
    conditioned on (a calibration); None conditions on the requests themselves."""
    start_params = torch.as_tensor(np.asarray(start_params), dtype=torch.float32)
    N = len(start_params)
    start_metric = problem.score(start_params, dataset)[metric].float()
    requested = prompts(best, start_metric, n_prompts, top_frac)  # [N, P]
    prompted = requested if condition is None else torch.as_tensor(condition(start_metric.double().numpy(), requested.double().numpy()),
                                                                  dtype=torch.float32)
    rep = lambda x: x.repeat_interleave(n_prompts, dim=0)
    theta = sample(model, diffusion, rep(start_params), rep(start_metric), prompted.reshape(-1), sampler, steps, generator,
                   guidance=guidance, temperature=temperature)
    scores = problem.score(theta, dataset)
    achieved = {k: v.double().numpy().reshape(N, n_prompts) for k, v in scores.items()}
    req = requested.double().numpy()
    return PromptResult(
        start_metric=start_metric.double().numpy(),
        requested=req,
        prompted=prompted.double().numpy(),
        achieved=achieved,
        params=theta.numpy().reshape(N, n_prompts, -1),
        metric=metric,
        r2=prompt_alignment_r2(req, achieved[metric]),
        pearson=pearson(req, achieved[metric]),
    )


def recursive_prompting(model: Gpt, diffusion: Diffusion, problem, dataset, start_params, target, k: int = 5,
                        metric: str = "test_loss", sampler: str = "ddim", steps: int | None = 1,
                        generator: torch.Generator | None = None, guidance: float = 1.0, temperature: float = 1.0) -> dict:
    """Feed G.pt's output back as the next start, ``k`` times, always asking for ``target [N]``.

    Returns ``params [k, N, n_params]`` and, for every metric of the problem, ``[k, N]`` (row s = after
    update s + 1), plus ``start`` metrics ``[N]``."""
    theta = torch.as_tensor(np.asarray(start_params), dtype=torch.float32)
    target = torch.as_tensor(np.asarray(target), dtype=torch.float32).reshape(-1)
    current = problem.score(theta, dataset)
    out = {"start": current[metric].double().numpy(), "params": []}
    for _ in range(k):
        theta = sample(model, diffusion, theta, current[metric], target, sampler, steps, generator, guidance=guidance,
                       temperature=temperature)
        current = problem.score(theta, dataset)
        out["params"].append(theta.numpy())
        for name, v in current.items():
            out.setdefault(name, []).append(v.double().numpy())
    return {name: np.stack(v) if isinstance(v, list) else v for name, v in out.items()}


CALIBRATION_SEED = 3_000_000_019  # fresh inits of their own: never an evaluation's (those are seeded 10_000_019 * (seed + 1) + k)


def fit_calibration(model: Gpt, diffusion: Diffusion, problem, dataset, start, metric: str, best: float, sampler: str,
                    steps: int, guidance: float, temperature: float, model_step: int, sampling_name: str,
                    grid: tuple[float, ...] = calibration.GRID) -> calibration.Calibration:
    """Prompt the calibration networks ``start [n, P]`` on ``grid`` (``calibration.grid_for``) and fit the map
    from prompt to achieved value (``calibration.fit``), with noise of its own (not an evaluation's stream).
    The caller draws them from ``CALIBRATION_SEED`` on, as the networks it will prompt are drawn: with room to
    improve (a CartPole policy at 496 of 500 that falls to 10 is v = -120 on the relative scale, and a few
    such drag a fit's mean at u = -0.125 to -0.22: docs/gpt-ablations.md)."""
    start = torch.as_tensor(np.asarray(start), dtype=torch.float32)
    n = len(start)
    start_metric = problem.score(start, dataset)[metric].double().numpy()
    prompts = calibration.grid_prompts(start_metric, best, grid)
    G = prompts.shape[1]
    theta = sample(model, diffusion, start.repeat_interleave(G, 0).numpy(), np.repeat(start_metric, G), prompts.ravel(),
                   sampler, steps, torch.Generator().manual_seed(CALIBRATION_SEED), guidance=guidance, temperature=temperature)
    achieved = problem.score(theta, dataset)[metric].double().numpy().reshape(n, G)
    return calibration.fit(start_metric, prompts, achieved, best, problems.sign(problem, metric), model_step, sampling_name,
                           grid)
