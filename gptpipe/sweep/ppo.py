"""PPO for K CartPole agents as one batched computation (the sweep trainer of ``problems.cartpole``).

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

from gptpipe.problems.cartpole import PPO, CartPolePolicy, evaluate_returns, make_env, orthogonal_init, split_flat, stacked_mlp
from gptpipe.sweep.config import RunsResult, SweepConfig, checkpoint_steps, lr_factor, run_generators
from gptpipe.sweep.optim import BatchedAdam
from gptpipe.sweep.recorder import CheckpointRecorder


class _Agents:
    """K agents' environments: one gymnasium vector env of K x E CartPoles, episode starts per agent."""

    def __init__(self, seeds: list[int], envs_per_agent: int):
        self.K, self.E = len(seeds), envs_per_agent
        self.env, self.raw = make_env(self.K * self.E)
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


class ActorCritic:
    """K policies (the stored parameters, first ``P`` columns) and their value networks (not stored)
    as one tensor ``params [K, P + critic]``."""

    def __init__(self, problem: CartPolePolicy, theta: torch.Tensor, generators: list[torch.Generator]):
        H = PPO["critic_hidden"]
        self.problem, self.P = problem, problem.n_params
        self.critic_shapes = [(H, 4), (H,), (H, H), (H,), (1, H), (1,)]
        critic = orthogonal_init(self.critic_shapes, [math.sqrt(2), math.sqrt(2), 1.0], generators)
        self.params = torch.cat([theta, critic], dim=1)

    def policy(self, p: torch.Tensor, obs: torch.Tensor) -> torch.Tensor:
        return self.problem.policy_logits(p[:, : self.P], obs)

    def value(self, p: torch.Tensor, obs: torch.Tensor) -> torch.Tensor:
        return stacked_mlp(split_flat(p[:, self.P :], self.critic_shapes), obs, torch.tanh).squeeze(-1)


@torch.no_grad()
def rollout(agents: _Agents, net: ActorCritic, generators: list[torch.Generator]) -> dict[str, torch.Tensor]:
    """``num_steps`` steps of every agent's environments with its sampled actions, then generalised
    advantage estimation (a truncation at 500 counts as an end). Tensors ``[K, N, ...]``, N = steps x envs."""
    K, E, T = agents.K, agents.E, PPO["num_steps"]
    obs_buf = torch.empty(T, K, E, 4)
    act_buf = torch.empty(T, K, E, dtype=torch.int64)
    logp_buf, val_buf, rew_buf, done_buf = (torch.empty(T, K, E) for _ in range(4))
    for t in range(T):
        obs = agents.obs()
        logits = net.policy(net.params, obs)
        u = torch.stack([torch.rand(E, generator=g) for g in generators])
        action = (u < torch.softmax(logits, -1)[..., 1]).long()
        obs_buf[t], act_buf[t], val_buf[t] = obs, action, net.value(net.params, obs)
        logp_buf[t] = torch.log_softmax(logits, -1).gather(-1, action.unsqueeze(-1)).squeeze(-1)
        reward, done = agents.step(action.reshape(-1).numpy())
        rew_buf[t] = torch.from_numpy(reward).view(K, E)
        done_buf[t] = torch.from_numpy(done).view(K, E).float()
    next_value = net.value(net.params, agents.obs())
    adv = torch.zeros(T, K, E)
    last = torch.zeros(K, E)
    for t in reversed(range(T)):
        not_done = 1.0 - done_buf[t]
        nv = next_value if t == T - 1 else val_buf[t + 1]
        delta = rew_buf[t] + PPO["gamma"] * nv * not_done - val_buf[t]
        last = delta + PPO["gamma"] * PPO["gae_lambda"] * not_done * last
        adv[t] = last
    flat = lambda x: x.transpose(0, 1).reshape(K, T * E, *x.shape[3:])
    return {"obs": flat(obs_buf), "act": flat(act_buf), "logp": flat(logp_buf), "adv": flat(adv), "ret": flat(adv + val_buf)}


def ppo_loss(net: ActorCritic, p: torch.Tensor, batch: dict[str, torch.Tensor], idx: torch.Tensor) -> torch.Tensor:
    """Per-agent clipped PPO objective + value loss - entropy bonus on the minibatch ``idx [K, mb]``."""
    K, mb = idx.shape
    o = torch.gather(batch["obs"], 1, idx.unsqueeze(-1).expand(K, mb, 4))
    a, lp_old, A, R = (torch.gather(batch[k], 1, idx) for k in ("act", "logp", "adv", "ret"))
    A = (A - A.mean(1, keepdim=True)) / (A.std(1, keepdim=True) + 1e-8)
    logits = torch.log_softmax(net.policy(p, o), -1)
    lp = logits.gather(-1, a.unsqueeze(-1)).squeeze(-1)
    ratio = (lp - lp_old).exp()
    pg = torch.maximum(-A * ratio, -A * ratio.clamp(1 - PPO["clip"], 1 + PPO["clip"])).mean(1)
    entropy = -(logits.exp() * logits).sum(-1).mean(1)
    v_loss = 0.5 * (net.value(p, o) - R).pow(2).mean(1)
    return pg - PPO["ent_coef"] * entropy + PPO["vf_coef"] * v_loss


def update(net: ActorCritic, adam: BatchedAdam, batch: dict[str, torch.Tensor], config: SweepConfig,
           scale: torch.Tensor, generators: list[torch.Generator]) -> None:
    """``update_epochs`` passes of minibatches over one rollout, each agent in its own order."""
    K, N = batch["act"].shape
    mb = min(config.batch_size, N)
    for _ in range(PPO["update_epochs"]):
        order = torch.stack([torch.randperm(N, generator=g) for g in generators])
        for m in range(N // mb):
            p = net.params.detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(ppo_loss(net, p, batch, order[:, m * mb : (m + 1) * mb]).sum(), p)
            with torch.no_grad():
                norm = grad.norm(dim=1, keepdim=True)
                grad.mul_((PPO["max_grad_norm"] / (norm + 1e-6)).clamp(max=1.0))
                if config.weight_decay:
                    grad.add_(net.params, alpha=config.weight_decay)
            adam.step(net.params, grad, scale)


def checkpoint(recorder: CheckpointRecorder, net: ActorCritic, adam: BatchedAdam) -> None:
    """Mark diverged agents (frozen at zero, so no NaNs leak into the shared computation) and keep the
    live policies with their evaluation return."""
    alive = recorder.mark_diverged(net.params)
    net.params[~alive] = 0.0
    adam.zero(~alive)
    policies = net.params[:, : net.P]
    returns = evaluate_returns(net.problem, policies[alive]) if bool(alive.any()) else torch.empty(0)
    recorder.store(policies, {"return": returns})


def train_runs(problem: CartPolePolicy, config: SweepConfig, runs, init: torch.Tensor | None = None) -> RunsResult:
    """PPO for the given runs of a sweep as one batched computation."""
    t0 = time.perf_counter()
    runs = list(runs)
    seeds, lrs, generators = run_generators(config, runs)
    theta = problem.init(generators)  # drawn even when replaced: the generators go on to data order / sampling
    if init is not None:
        theta = init.detach().clone().float()
    net = ActorCritic(problem, theta, generators)
    adam = BatchedAdam(net.params, lrs, config.momentum, PPO["adam_beta2"], PPO["adam_eps"])
    recorder = CheckpointRecorder(checkpoint_steps(config, None), len(runs), problem.n_params, problem.metrics)
    agents = _Agents(seeds, PPO["num_envs"])
    if recorder.due(0):
        checkpoint(recorder, net, adam)
    try:
        for it in range(config.epochs):
            batch = rollout(agents, net, generators)
            update(net, adam, batch, config, lr_factor(config, it, config.epochs) * recorder.alive, generators)
            if recorder.due(it + 1):
                checkpoint(recorder, net, adam)
    finally:
        agents.close()
    env_steps = config.epochs * PPO["num_envs"] * PPO["num_steps"]
    return recorder.result(recorder.steps.astype(np.float64), seeds, lrs, time.perf_counter() - t0,
                           extra={"env_steps_per_agent": int(env_steps),
                                  "train_episode_return_last": [float(np.mean(f[-10:])) if f else float("nan")
                                                                for f in agents.finished]})
