"""CartPole: policy layout and symmetry, the deterministic return metric, batched PPO, a tiny collection."""

import numpy as np
import pytest
import torch

from gptpipe import data, problems, sweep
from gptpipe.problems import cartpole
from gptpipe.stages import collect
from storage import catalog, params, sweeps
from storage.store import open_store


@pytest.fixture
def problem():
    return problems.get("cartpole")


def policies(problem, n, seed=0):
    return problem.init([torch.Generator().manual_seed(seed + i) for i in range(n)])


def test_layout_and_recipe(problem):
    assert problem.n_params == 1282
    assert [(k, tuple(v.shape)) for k, v in problem.module().state_dict().items()] == [(l.name, l.shape) for l in problem.layers]
    assert problems.sign(problem, "return") == -1 and problems.sign(problems.get("digits_mlp"), "test_loss") == 1
    assert problems.best_of(problem, "return", [3.0, np.nan, 9.0]) == 9.0
    config = sweep.SweepConfig(problem="cartpole", runs=2)
    assert config.data == "gym" and config.lr_max == problem.recipe["lr_max"] and config.epochs == problem.recipe["epochs"]
    assert data.load("gym") is None


def test_policy_is_the_module(problem):
    theta = policies(problem, 3)
    obs = torch.randn(3, 7, 4)
    for k in range(3):
        model = problem.module()
        model.load_state_dict(problem.state_dict(theta[k]))
        with torch.no_grad():
            torch.testing.assert_close(problem.policy_logits(theta, obs)[k], model(obs[k]), rtol=1e-5, atol=1e-6)


def test_permutation_preserves_the_function(problem):
    theta = policies(problem, 4) + 0.1 * torch.randn(4, problem.n_params, generator=torch.Generator().manual_seed(5))
    perm = problem.sample_permutation(4, torch.Generator().manual_seed(0))
    assert perm.shape == (4, 64)
    permuted = problem.permute(theta, perm=perm)
    assert not torch.allclose(permuted, theta)
    obs = torch.randn(4, 11, 4)
    torch.testing.assert_close(problem.policy_logits(permuted, obs), problem.policy_logits(theta, obs), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(problem.score(permuted)["return"], problem.score(theta)["return"])


def test_canonical_order_is_one_per_function(problem):
    """Every reordering of a policy's hidden units has the same canonical form, which computes the same
    function and lists each layer's units by the angle of their (pole angle, angular velocity) weights."""
    theta = policies(problem, 4) + 0.1 * torch.randn(4, problem.n_params, generator=torch.Generator().manual_seed(5))
    canonical = problem.permute(theta, perm=problem.canonical_permutation(theta))
    shuffled = problem.permute(theta, perm=problem.sample_permutation(4, torch.Generator().manual_seed(1)))
    assert not torch.equal(shuffled, theta)
    torch.testing.assert_close(problem.permute(shuffled, perm=problem.canonical_permutation(shuffled)), canonical)
    obs = torch.randn(4, 11, 4)
    torch.testing.assert_close(problem.policy_logits(canonical, obs), problem.policy_logits(theta, obs), rtol=1e-4, atol=1e-5)
    w1, _, w2, _, _, _ = problem.unflatten(canonical)
    for w in (w1, w2 @ w1):
        angle = torch.atan2(w[..., 3], w[..., 2])
        assert bool((angle.diff(dim=1) >= 0).all())
    # a canonical policy is its own canonical form
    assert torch.equal(problem.canonical_permutation(canonical), torch.arange(32).repeat(4, 2))


def plain_return(problem, vector: torch.Tensor) -> float:
    """One policy, one ordinary gymnasium env per fixed evaluation episode."""
    import gymnasium as gym

    model = problem.module()
    model.load_state_dict(problem.state_dict(vector))
    starts = cartpole.eval_initial_states()
    total = 0
    for i in range(starts.shape[1]):
        env = gym.make("CartPole-v1")
        env.reset(seed=0)
        env.unwrapped.state = starts[:, i].copy()
        obs = np.asarray(env.unwrapped.state, dtype=np.float32)
        done = False
        while not done:
            with torch.no_grad():
                action = int(model(torch.from_numpy(obs)).argmax())
            obs, reward, terminated, truncated, _ = env.step(action)
            total += reward
            done = terminated or truncated
        env.close()
    return total / starts.shape[1]


def test_score_is_deterministic_and_per_policy(problem):
    theta = policies(problem, 6)
    theta[3] = 0.0  # ties -> action 0 always
    first = problem.score(theta)["return"]
    assert first.shape == (6,)
    torch.testing.assert_close(problem.score(theta)["return"], first)
    torch.testing.assert_close(problem.score(theta[[4, 1]])["return"], first[[4, 1]])  # batching does not matter
    assert ((first >= 1) & (first <= 500)).all()
    for k in (0, 3):
        assert first[k].item() == pytest.approx(plain_return(problem, theta[k]))


def test_ppo_learns_and_runs_do_not_depend_on_grouping():
    config = sweep.SweepConfig(problem="cartpole", runs=3, epochs=12, checkpoints=4, lr_min=3e-3, lr_max=3e-3)
    together = sweep.train_runs(config, range(3), None)
    alone = sweep.train_runs(config, [2], None)
    assert together.params.shape == (3, 4, 1282) and together.metrics["return"].shape == (3, 4)
    np.testing.assert_allclose(together.params[2], alone.params[0], atol=2e-4)  # float rounding of batched kernels only
    assert together.steps.tolist() == [0, 4, 8, 12]
    # the stored return is the score of the stored parameters
    problem = problems.get("cartpole")
    np.testing.assert_allclose(together.metrics["return"][:, -1], problem.score(torch.from_numpy(together.params[:, -1]))["return"].numpy())
    assert together.metrics["return"][:, -1].mean() > together.metrics["return"][:, 0].mean()


def test_tiny_collection_into_a_store(tmp_path):
    url = str(tmp_path / "store")
    config = sweep.SweepConfig(problem="cartpole", runs=3, shard_size=2, epochs=4, checkpoints=3)
    todo = collect.prepare(url, "cp", config, None)
    assert todo == [0, 1]
    store = open_store(url)
    for shard in todo:
        summary = collect.collect_shard(store, "cp", shard)
        assert "best_return" in summary
    frozen = sweeps.read_config(store, "cp")
    assert frozen["metrics"] == ["return"] and frozen["n_train"] == 0 and frozen["settings"]["eval_episodes"] == 16
    rows = catalog.query(store, "select run, ckpt, step, epoch, return from checkpoints order by run, ckpt").to_pylist()
    assert len(rows) == 9 and [r["step"] for r in rows[:3]] == [0, 2, 4]
    runs = catalog.query(store, "select run, status, best_return, final_return from runs order by run").to_pylist()
    assert [r["status"] for r in runs] == ["ok"] * 3
    for r in runs:
        got = [x["return"] for x in rows if x["run"] == r["run"]]
        assert r["best_return"] == max(got) and r["final_return"] == got[-1]
    arr = params.open_params(store, "sweeps", "cp", "params.zarr")
    assert arr.shape == (3, 3, 1282)
    score = problems.get("cartpole").score(torch.from_numpy(np.asarray(arr[1, 2])[None]))["return"].item()
    assert score == pytest.approx(rows[5]["return"])
    assert collect.prepare(url, "cp", config, None) == []
