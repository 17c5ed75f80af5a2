"""CartPole: the paper's reinforcement-learning problem, with PPO for K agents as one batched computation.

Policy (``module()``, flat order = its ``state_dict`` order, 1,282 parameters)::

    nn.Sequential(nn.Linear(4, 32), nn.SELU(), nn.Linear(32, 32), nn.SELU(), nn.Linear(32, 2))

with orthogonal init (gain 1 for the hidden layers, 0.01 for the action layer, zero biases). The metric
``return`` is the mean undiscounted return of the *deterministic* policy (argmax action) over
``EVAL_EPISODES`` = 16 episodes of gymnasium's ``CartPole-v1`` (at most 500 steps, so 0-500; higher is
better) whose initial states are fixed: ``np.random.default_rng(EVAL_SEED).uniform(-0.05, 0.05, (4, 16))``
(column i = episode i's state), the same for every policy. ``score`` evaluates N policies in one
vectorised environment of N x 16 CartPoles.

Training (``train_runs``): PPO as in the usual CartPole recipe (clipped objective, GAE, entropy bonus,
per-agent gradient-norm clipping, Adam). Each agent has its own ``PPO["num_envs"]`` environments, its own
seed (initial weights, action sampling, minibatch order: a torch generator; episode starts: a numpy
generator from ``SeedSequence([seed, 1])``) and its own learning rate; all K agents' policies and value
networks are stacked and updated with batched matrix products, and all K x num_envs CartPoles are one
gymnasium vector environment. Episodes restart in the same step they end (the new start state drawn
from the agent's own generator), so no transition is wasted on gymnasium's next-step autoreset.

Recipe mapping (``SweepConfig``): ``epochs`` = PPO iterations (one rollout of num_steps x num_envs
transitions per agent, then ``update_epochs`` passes of minibatches), ``batch_size`` = minibatch size,
``lr_min``/``lr_max`` = Adam's learning-rate range, ``momentum`` = Adam's beta1, ``weight_decay`` = L2
added to the gradient, ``schedule`` = the learning-rate schedule over iterations; ``nesterov`` is unused.
A checkpoint's ``step`` and ``epoch`` are both the PPO iteration after which it was taken.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch
from torch import nn

from gptpipe.problems import Layer

MAX_RETURN = 500
EVAL_EPISODES = 16
EVAL_SEED = 20220917
PPO = dict(num_envs=8, num_steps=64, update_epochs=4, gamma=0.99, gae_lambda=0.95, clip=0.2, ent_coef=0.01,
           vf_coef=0.5, max_grad_norm=0.5, adam_beta2=0.999, adam_eps=1e-5, critic_hidden=64)
DIVERGED_ABS = 1e4


def _make_env(n: int):
    import gymnasium as gym

    env = gym.make_vec("CartPole-v1", num_envs=n, vectorization_mode="vector_entry_point")
    return env, env.unwrapped


def eval_initial_states(episodes: int = EVAL_EPISODES) -> np.ndarray:
    """The fixed start states of the evaluation episodes, ``[4, episodes]`` (float64)."""
    return np.random.default_rng(EVAL_SEED).uniform(-0.05, 0.05, size=(4, episodes))


def _mlp(weights: list[torch.Tensor], x: torch.Tensor, act) -> torch.Tensor:
    """Stacked MLP: ``weights = [W1 [K, o, i], b1 [K, o], ...]``, ``x [K, B, i]``."""
    n = len(weights) // 2
    for layer in range(n):
        w, b = weights[2 * layer], weights[2 * layer + 1]
        x = torch.baddbmm(b.unsqueeze(1), x, w.transpose(1, 2))
        if layer < n - 1:
            x = act(x)
    return x


def _orthogonal(shapes: list[tuple[int, ...]], gains: list[float], generators: list[torch.Generator]) -> torch.Tensor:
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


def _split(theta: torch.Tensor, shapes: list[tuple[int, ...]]) -> list[torch.Tensor]:
    out, start = [], 0
    for shape in shapes:
        n = math.prod(shape)
        out.append(theta[:, start : start + n].reshape(theta.shape[0], *shape))
        start += n
    return out


class CartPolePolicy:
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
        self.n_params = sum(layer.numel for layer in self.layers)
        self.n_units = (hidden, hidden)

    # --- layout -------------------------------------------------------------------------------
    def unflatten(self, theta: torch.Tensor) -> list[torch.Tensor]:
        return _split(theta, [layer.shape for layer in self.layers])

    def module(self) -> nn.Module:
        return nn.Sequential(nn.Linear(4, self.hidden), nn.SELU(), nn.Linear(self.hidden, self.hidden), nn.SELU(),
                             nn.Linear(self.hidden, 2))

    def state_dict(self, vector: torch.Tensor) -> dict[str, torch.Tensor]:
        return {layer.name: p[0].clone() for layer, p in zip(self.layers, self.unflatten(vector.reshape(1, -1)))}

    def load_data(self, source: str, root: str | None = None):
        return None

    def init(self, generators: list[torch.Generator]) -> torch.Tensor:
        return _orthogonal([layer.shape for layer in self.layers], [1.0, 1.0, 0.01], generators)

    # --- compute ------------------------------------------------------------------------------
    def policy_logits(self, theta: torch.Tensor, obs: torch.Tensor) -> torch.Tensor:
        """Policy k on its own observations: ``theta [K, P]``, ``obs [K, B, 4]`` -> ``[K, B, 2]``."""
        return _mlp(self.unflatten(theta), obs, nn.functional.selu)

    @torch.no_grad()
    def score(self, theta: torch.Tensor, data=None, episodes: int = EVAL_EPISODES, chunk: int = 4096) -> dict[str, torch.Tensor]:
        """``return`` of each of N policies (see the module docstring); deterministic."""
        out = [evaluate_returns(self, part, episodes) for part in theta.float().split(chunk)]
        return {"return": torch.cat(out) if out else torch.empty(0)}

    def train_runs(self, config, runs, dataset=None, init: torch.Tensor | None = None):
        return train_runs(self, config, runs, init)

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
    env, raw = _make_env(len(ids))
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
                env, raw = _make_env(len(ids))
                env.reset(seed=EVAL_SEED)
                raw.state, raw.steps = state.copy(), steps.copy()
                running = np.ones(len(ids), dtype=bool)
    finally:
        env.close()
    return torch.from_numpy(returns.reshape(n, episodes).mean(1)).float()


class _Agents:
    """K agents' environments: one gymnasium vector env of K x E CartPoles, episode starts per agent."""

    def __init__(self, seeds: list[int], envs_per_agent: int):
        self.K, self.E = len(seeds), envs_per_agent
        self.env, self.raw = _make_env(self.K * self.E)
        self.env.reset(seed=0)
        self.rngs = [np.random.default_rng(np.random.SeedSequence([s, 1])) for s in seeds]
        self.raw.state = np.concatenate([r.uniform(-0.05, 0.05, size=(4, self.E)) for r in self.rngs], axis=1)
        self.raw.steps[:] = 0
        self.episode_return = np.zeros(self.K * self.E)
        self.finished: list[list[float]] = [[] for _ in seeds]  # training-episode returns per agent

    def obs(self) -> torch.Tensor:
        return torch.from_numpy(self.raw.state.T.astype(np.float32)).view(self.K, self.E, 4)

    def step(self, action: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        _, reward, terminated, truncated, _ = self.env.step(action)
        done = terminated | truncated
        self.episode_return += reward
        for j in np.flatnonzero(done):
            self.finished[j // self.E].append(float(self.episode_return[j]))
        self.episode_return[done] = 0.0
        for k in np.unique(np.flatnonzero(done) // self.E):  # restart now, from the agent's own generator
            idx = k * self.E + np.flatnonzero(done[k * self.E : (k + 1) * self.E])
            self.raw.state[:, idx] = self.rngs[k].uniform(-0.05, 0.05, size=(4, len(idx)))
            self.raw.steps[idx] = 0
        self.raw.prev_done[:] = False
        return reward.astype(np.float32), done

    def close(self):
        self.env.close()


def train_runs(problem: CartPolePolicy, config, runs, init: torch.Tensor | None = None):
    """PPO for the given runs of a sweep as one batched computation; returns ``sweep.RunsResult``."""
    from gptpipe import sweep

    t0 = time.perf_counter()
    runs = list(runs)
    K = len(runs)
    seeds, us = zip(*[sweep.run_seed(config.seed, r) for r in runs])
    lrs = [sweep.run_lr(config, u) for u in us]
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    E, T = PPO["num_envs"], PPO["num_steps"]
    N = E * T
    mb = min(config.batch_size, N)
    n_mb = N // mb

    P = problem.n_params
    theta = problem.init(gens)
    if init is not None:
        theta = init.detach().clone().float()
    H = PPO["critic_hidden"]
    critic_shapes = [(H, 4), (H,), (H, H), (H,), (1, H), (1,)]
    params = torch.cat([theta, _orthogonal(critic_shapes, [math.sqrt(2), math.sqrt(2), 1.0], gens)], dim=1)
    exp_avg, exp_avg_sq = torch.zeros_like(params), torch.zeros_like(params)
    lr = torch.tensor(lrs).unsqueeze(1)
    alive = torch.ones(K, 1)
    b1, b2, eps = config.momentum, PPO["adam_beta2"], PPO["adam_eps"]
    adam_step = 0

    def policy(p, obs):
        return problem.policy_logits(p[:, :P], obs)

    def value(p, obs):
        return _mlp(_split(p[:, P:], critic_shapes), obs, torch.tanh).squeeze(-1)

    total = config.epochs
    ckpt_steps = sweep.checkpoint_steps(config, None)
    C = len(ckpt_steps)
    out = np.full((K, C, P), np.nan, dtype=np.float32)
    returns = np.full((K, C), np.nan, dtype=np.float64)
    n_ckpts = [C] * K

    def take_checkpoint(c: int) -> None:
        t = params[:, :P]
        ok = torch.isfinite(params).all(1) & (params.abs().amax(1) < DIVERGED_ABS) & (alive[:, 0] > 0)
        for k in range(K):
            if not ok[k] and alive[k, 0] > 0:
                n_ckpts[k] = c
                alive[k, 0] = 0.0
        dead = alive[:, 0] == 0
        if bool(dead.any()):
            params[dead] = 0.0  # frozen at zero: no NaNs leak into the shared computation
            exp_avg[dead] = 0.0
            exp_avg_sq[dead] = 0.0
        keep = (~dead).numpy()
        out[keep, c] = t[~dead].numpy()
        if keep.any():
            returns[keep, c] = evaluate_returns(problem, t[~dead]).double().numpy()

    agents = _Agents(list(seeds), E)
    c = 0
    if ckpt_steps[0] == 0:
        take_checkpoint(0)
        c = 1
    try:
        for it in range(total):
            obs_buf = torch.empty(T, K, E, 4)
            act_buf = torch.empty(T, K, E, dtype=torch.int64)
            logp_buf, val_buf, rew_buf, done_buf = (torch.empty(T, K, E) for _ in range(4))
            with torch.no_grad():
                for t in range(T):
                    obs = agents.obs()
                    logits = policy(params, obs)
                    u = torch.stack([torch.rand(E, generator=g) for g in gens])
                    action = (u < torch.softmax(logits, -1)[..., 1]).long()
                    obs_buf[t], act_buf[t], val_buf[t] = obs, action, value(params, obs)
                    logp_buf[t] = torch.log_softmax(logits, -1).gather(-1, action.unsqueeze(-1)).squeeze(-1)
                    reward, done = agents.step(action.reshape(-1).numpy())
                    rew_buf[t] = torch.from_numpy(reward).view(K, E)
                    done_buf[t] = torch.from_numpy(done).view(K, E).float()
                # generalised advantage estimation (a truncation at 500 counts as an end)
                next_value = value(params, agents.obs())
                adv = torch.zeros(T, K, E)
                last = torch.zeros(K, E)
                for t in reversed(range(T)):
                    not_done = 1.0 - done_buf[t]
                    nv = next_value if t == T - 1 else val_buf[t + 1]
                    delta = rew_buf[t] + PPO["gamma"] * nv * not_done - val_buf[t]
                    last = delta + PPO["gamma"] * PPO["gae_lambda"] * not_done * last
                    adv[t] = last
                ret = adv + val_buf
            flat = lambda x: x.transpose(0, 1).reshape(K, N, *x.shape[3:])
            b_obs, b_act, b_logp, b_adv, b_ret = flat(obs_buf), flat(act_buf), flat(logp_buf), flat(adv), flat(ret)
            step_lr = lr * sweep.lr_factor(config, it, total) * alive
            for _ in range(PPO["update_epochs"]):
                order = torch.stack([torch.randperm(N, generator=g) for g in gens])
                for m in range(n_mb):
                    idx = order[:, m * mb : (m + 1) * mb]
                    o = torch.gather(b_obs, 1, idx.unsqueeze(-1).expand(K, mb, 4))
                    a, lp_old, A, R = (torch.gather(x, 1, idx) for x in (b_act, b_logp, b_adv, b_ret))
                    A = (A - A.mean(1, keepdim=True)) / (A.std(1, keepdim=True) + 1e-8)
                    p = params.detach().requires_grad_(True)
                    logits = torch.log_softmax(policy(p, o), -1)
                    lp = logits.gather(-1, a.unsqueeze(-1)).squeeze(-1)
                    ratio = (lp - lp_old).exp()
                    pg = torch.maximum(-A * ratio, -A * ratio.clamp(1 - PPO["clip"], 1 + PPO["clip"])).mean(1)
                    entropy = -(logits.exp() * logits).sum(-1).mean(1)
                    v_loss = 0.5 * (value(p, o) - R).pow(2).mean(1)
                    loss = pg - PPO["ent_coef"] * entropy + PPO["vf_coef"] * v_loss
                    (grad,) = torch.autograd.grad(loss.sum(), p)
                    with torch.no_grad():
                        norm = grad.norm(dim=1, keepdim=True)
                        grad.mul_((PPO["max_grad_norm"] / (norm + 1e-6)).clamp(max=1.0))
                        if config.weight_decay:
                            grad.add_(params, alpha=config.weight_decay)
                        # torch.optim.Adam, one learning rate per agent
                        adam_step += 1
                        exp_avg.mul_(b1).add_(grad, alpha=1 - b1)
                        exp_avg_sq.mul_(b2).addcmul_(grad, grad, value=1 - b2)
                        denom = (exp_avg_sq.sqrt() / math.sqrt(1 - b2 ** adam_step)).add_(eps)
                        params.sub_(step_lr / (1 - b1 ** adam_step) * exp_avg / denom)
            if c < C and it + 1 == ckpt_steps[c]:
                take_checkpoint(c)
                c += 1
    finally:
        agents.close()
    assert c == C, (c, C)
    return sweep.RunsResult(
        params=out,
        metrics={"return": returns},
        steps=ckpt_steps,
        epochs=ckpt_steps.astype(np.float64),
        seeds=list(seeds),
        lrs=lrs,
        n_ckpts=n_ckpts,
        wall_s=time.perf_counter() - t0,
        extra={"env_steps_per_agent": int(total * N),
               "train_episode_return_last": [float(np.mean(f[-10:])) if f else float("nan") for f in agents.finished]},
    )
