"""CartPole: the paper's reinforcement-learning problem: a policy network scored in a vectorised simulator.

Policy (``module()``, flat order = its ``state_dict`` order, 1,282 parameters)::

    nn.Sequential(nn.Linear(4, 32), nn.SELU(), nn.Linear(32, 32), nn.SELU(), nn.Linear(32, 2))

with orthogonal init (gain 1 for the hidden layers, 0.01 for the action layer, zero biases). The metric
``return`` is the mean undiscounted return of the *deterministic* policy (argmax action) over
``EVAL_EPISODES`` = 16 episodes of gymnasium's ``CartPole-v1`` (at most 500 steps, so 0-500; higher is
better) whose initial states are fixed: ``np.random.default_rng(EVAL_SEED).uniform(-0.05, 0.05, (4, 16))``
(column i = episode i's state), the same for every policy. ``score`` evaluates N policies in one
vectorised environment of N x 16 CartPoles.

The PPO trainer that collects CartPole sweeps is ``gptpipe.sweep.ppo``.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from gptpipe.problems.base import Layer, Problem

MAX_RETURN = 500
EVAL_EPISODES = 16
EVAL_SEED = 20220917
PPO = dict(num_envs=8, num_steps=64, update_epochs=4, gamma=0.99, gae_lambda=0.95, clip=0.2, ent_coef=0.01,
           vf_coef=0.5, max_grad_norm=0.5, adam_beta2=0.999, adam_eps=1e-5, critic_hidden=64)


def make_env(n: int):
    import gymnasium as gym

    env = gym.make_vec("CartPole-v1", num_envs=n, vectorization_mode="vector_entry_point")
    return env, env.unwrapped


def eval_initial_states(episodes: int = EVAL_EPISODES) -> np.ndarray:
    """The fixed start states of the evaluation episodes, ``[4, episodes]`` (float64)."""
    return np.random.default_rng(EVAL_SEED).uniform(-0.05, 0.05, size=(4, episodes))


def stacked_mlp(weights: list[torch.Tensor], x: torch.Tensor, act) -> torch.Tensor:
    """Stacked MLP: ``weights = [W1 [K, o, i], b1 [K, o], ...]``, ``x [K, B, i]``."""
    n = len(weights) // 2
    for layer in range(n):
        w, b = weights[2 * layer], weights[2 * layer + 1]
        x = torch.baddbmm(b.unsqueeze(1), x, w.transpose(1, 2))
        if layer < n - 1:
            x = act(x)
    return x


def orthogonal_init(shapes: list[tuple[int, ...]], gains: list[float], generators: list[torch.Generator]) -> torch.Tensor:
    """Flat vectors of layers ``shapes`` (weight, bias, weight, bias ...): orthogonal weights with the
    given gain per weight, zero biases; one vector per generator."""
    out = []
    for g in generators:
        parts = []
        for i, shape in enumerate(shapes):
            t = torch.zeros(shape)
            if len(shape) == 2:
                nn.init.orthogonal_(t, gain=gains[i // 2], generator=g)
            parts.append(t.reshape(-1))
        out.append(torch.cat(parts))
    return torch.stack(out)


def split_flat(theta: torch.Tensor, shapes: list[tuple[int, ...]]) -> list[torch.Tensor]:
    out, start = [], 0
    for shape in shapes:
        n = math.prod(shape)
        out.append(theta[:, start : start + n].reshape(theta.shape[0], *shape))
        start += n
    return out


class CartPolePolicy(Problem):
    """The paper's CartPole policy: return of the argmax policy over fixed episodes (higher is better)."""

    trainer = "ppo"
    has_canonical_order = True
    metrics = ("return",)
    prompt_metrics = ("return",)
    primary = "return"
    higher_is_better: tuple[str, ...] = ("return",)
    recipe = dict(epochs=80, lr_min=1e-4, lr_max=3e-3, momentum=0.9, nesterov=False, weight_decay=0.0,
                  batch_size=128, schedule="cosine")
    settings = {"algorithm": "ppo", **PPO, "eval_episodes": EVAL_EPISODES, "eval_seed": EVAL_SEED,
                "env": "CartPole-v1", "policy": "4-32-32-2 SELU, orthogonal init (gains 1, 1, 0.01)",
                "critic": "4-64-64-1 tanh, orthogonal init (gains sqrt 2, sqrt 2, 1), not stored"}

    def __init__(self, name: str, hidden: int = 32, default_data: str = "gym", data_sources: tuple[str, ...] = ("gym",)):
        self.name = name
        self.hidden = hidden
        self.default_data = default_data
        self.data_sources = data_sources
        self.layers = (
            Layer("0.weight", (hidden, 4)), Layer("0.bias", (hidden,)),
            Layer("2.weight", (hidden, hidden)), Layer("2.bias", (hidden,)),
            Layer("4.weight", (2, hidden)), Layer("4.bias", (2,)),
        )
        self.n_units = (hidden, hidden)

    # --- layout ---------------------------------------------------------------------------------
    def module(self) -> nn.Module:
        return nn.Sequential(nn.Linear(4, self.hidden), nn.SELU(), nn.Linear(self.hidden, self.hidden), nn.SELU(),
                             nn.Linear(self.hidden, 2))

    def load_data(self, source: str, root: str | None = None):
        return None

    def init(self, generators: list[torch.Generator]) -> torch.Tensor:
        return orthogonal_init([layer.shape for layer in self.layers], [1.0, 1.0, 0.01], generators)

    # --- compute ------------------------------------------------------------------------------
    def policy_logits(self, theta: torch.Tensor, obs: torch.Tensor) -> torch.Tensor:
        """Policy k on its own observations: ``theta [K, P]``, ``obs [K, B, 4]`` -> ``[K, B, 2]``."""
        return stacked_mlp(self.unflatten(theta), obs, nn.functional.selu)

    @torch.no_grad()
    def score(self, theta: torch.Tensor, data=None, episodes: int = EVAL_EPISODES, chunk: int = 4096) -> dict[str, torch.Tensor]:
        """``return`` of each of N policies (see the module docstring); deterministic."""
        out = [evaluate_returns(self, part, episodes) for part in theta.float().split(chunk)]
        return {"return": torch.cat(out) if out else torch.empty(0)}

    # --- symmetry -----------------------------------------------------------------------------
    def sample_permutation(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``[n, 2 * hidden]``: columns ``:hidden`` order the first hidden layer, the rest the second."""
        p1 = torch.argsort(torch.rand(n, self.hidden, generator=generator), dim=1)
        p2 = torch.argsort(torch.rand(n, self.hidden, generator=generator), dim=1)
        return torch.cat([p1, p2], dim=1)

    def canonical_permutation(self, theta: torch.Tensor) -> torch.Tensor:
        """``[n, 2 * hidden]``: the order that puts each policy's hidden units in its canonical order
        (``permute(theta, perm=...)`` applies it). A unit's key is the direction of its input weights in
        the (pole angle, pole angular velocity) plane, the two observations a balancing policy acts on:
        for the first layer its own weights, for the second its linearised weights on the observations
        (``W2 @ W1``). Sorted by that angle, unit k of one policy looks at the state much as unit k of
        another, so PPO's updates line up across runs: applied to fresh inits, the mean update of the 8
        nearest training runs reaches a return of 488 in canonical order and 56 in stored order
        (docs/gpt-ablations.md). Any permuted copy of a policy has the same canonical form (up to ties)."""
        w1, _, w2, _, _, _ = self.unflatten(theta.float())
        angle = lambda w: torch.atan2(w[..., 3], w[..., 2])
        return torch.cat([torch.argsort(angle(w1), dim=1), torch.argsort(angle(w2 @ w1), dim=1)], dim=1)

    def permute(self, theta: torch.Tensor, generator: torch.Generator | None = None, perm: torch.Tensor | None = None) -> torch.Tensor:
        """Shuffle both hidden layers' units of each policy (the same function)."""
        n = theta.shape[0]
        if perm is None:
            perm = self.sample_permutation(n, generator)
        perm = perm.to(theta.device)
        p1, p2 = perm[:, : self.hidden], perm[:, self.hidden :]
        w1, b1, w2, b2, w3, b3 = self.unflatten(theta)
        w1 = torch.gather(w1, 1, p1.unsqueeze(-1).expand_as(w1))
        b1 = torch.gather(b1, 1, p1)
        w2 = torch.gather(w2, 1, p2.unsqueeze(-1).expand_as(w2))
        w2 = torch.gather(w2, 2, p1.unsqueeze(1).expand_as(w2))
        b2 = torch.gather(b2, 1, p2)
        w3 = torch.gather(w3, 2, p2.unsqueeze(1).expand_as(w3))
        return torch.cat([t.reshape(n, -1) for t in (w1, b1, w2, b2, w3, b3)], dim=1)


@torch.no_grad()
def evaluate_returns(problem: CartPolePolicy, theta: torch.Tensor, episodes: int = EVAL_EPISODES) -> torch.Tensor:
    """Mean return ``[N]`` of the argmax policies ``theta [N, P]`` over the fixed evaluation episodes,
    all N x episodes CartPoles in one vector environment. Episodes that have ended are dropped: when
    fewer than half of the environment's CartPoles are still running, the running ones move (state and
    step count) into a new, smaller vector environment, so the cost follows the steps actually played."""
    n = theta.shape[0]
    if n == 0:
        return torch.empty(0)
    ids = np.arange(n * episodes)  # episode of each slot of the current env: policy id // episodes, episode id % episodes
    env, raw = make_env(len(ids))
    env.reset(seed=EVAL_SEED)
    raw.state = np.tile(eval_initial_states(episodes), (1, n))
    running = np.ones(len(ids), dtype=bool)  # per slot
    returns = np.zeros(n * episodes, dtype=np.int64)
    full_obs = torch.zeros(n * episodes, 4)
    full_action = np.zeros(n * episodes, dtype=np.int64)
    try:
        for _ in range(MAX_RETURN):
            full_obs[torch.from_numpy(ids)] = torch.from_numpy(raw.state.T.astype(np.float32))
            active = np.unique(ids[running] // episodes)  # policies with an episode still running
            sel = torch.from_numpy(active)
            logits = problem.policy_logits(theta[sel], full_obs.view(n, episodes, 4)[sel])
            full_action.reshape(n, episodes)[active] = logits.argmax(-1).numpy()
            _, _, terminated, _, _ = env.step(full_action[ids])
            returns[ids[running]] += 1
            running &= ~terminated
            if not running.any():
                break
            if running.sum() < len(ids) // 2:  # compact: keep only the running episodes
                state, steps = raw.state[:, running], raw.steps[running]
                ids = ids[running]
                env.close()
                env, raw = make_env(len(ids))
                env.reset(seed=EVAL_SEED)
                raw.state, raw.steps = state.copy(), steps.copy()
                running = np.ones(len(ids), dtype=bool)
    finally:
        env.close()
    return torch.from_numpy(returns.reshape(n, episodes).mean(1)).float()


