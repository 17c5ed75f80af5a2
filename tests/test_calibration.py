"""Prompt calibration: fitted on a G.pt whose bias is known, it asks for what delivers the request."""

import numpy as np
import pytest

from gptpipe.evaluation import calibration


def biased_gpt(u):
    """Delivers more than asked in the middle (like the CartPole model) and never quite the best."""
    u = np.asarray(u, np.float64)
    return np.where(u < -0.25, 0.0, np.clip(0.2 + 0.9 * u, 0.0, 0.95))


@pytest.mark.parametrize("best, starts", [(500.0, [10.0, 60.0, 150.0, 300.0]),  # a return: higher is better
                                          (0.3, [2.3, 2.1, 1.5, 0.9])])  # a loss: lower is better
def test_condition_inverts_the_fitted_bias(best, starts):
    sign = -1 if best > starts[0] else 1
    rng = np.random.default_rng(0)
    start = np.repeat(starts, 8)
    prompts = calibration.grid_prompts(start, best)
    assert (sign * (prompts - best)).min() == pytest.approx(0)  # never past the best
    u = calibration.relative(prompts, start[:, None], best)
    achieved = start[:, None] + (biased_gpt(u) + rng.normal(0, 0.02, u.shape)) * (best - start[:, None])
    cal = calibration.fit(start, prompts, achieved, best, sign, step=7)
    assert cal.step == 7 and cal.networks == len(start)
    assert np.all(np.diff(cal.v) >= 0)  # monotone

    start = start[::8]  # one network of each start value
    requested = start[:, None] + np.array([[0.2, 0.4, 0.6]]) * (best - start[:, None])
    given = calibration.condition(cal.to_dict(), start, requested, sign)
    delivered = start[:, None] + biased_gpt(calibration.relative(given, start[:, None], best)) * (best - start[:, None])
    raw = start[:, None] + biased_gpt(calibration.relative(requested, start[:, None], best)) * (best - start[:, None])
    scale = abs(best - start[:, None])
    assert np.abs((delivered - requested) / scale).max() < 0.05  # within the noise of the fit
    assert np.abs((raw - requested) / scale).min() > 0.08  # uncalibrated, every request missed
    # the best is asked for as the best (never past it: prompts beyond the training data derail G.pt)
    top = calibration.condition(cal, start, np.full((4, 1), best), sign)
    np.testing.assert_allclose(top, best)


def test_no_calibration_or_no_room_leaves_the_request():
    requested = np.array([[400.0, 450.0], [480.0, 490.0]])
    np.testing.assert_array_equal(calibration.condition(None, [100.0, 500.0], requested, -1), requested)
    cal = calibration.Calibration(u=list(calibration.GRID), v=[0.5 * (u + 1) for u in calibration.GRID],
                                  best=500.0, networks=1, step=0)
    given = calibration.condition(cal, [100.0, 500.0], requested, -1)
    assert given[0, 0] != requested[0, 0]
    np.testing.assert_array_equal(given[1], requested[1])  # a network at the best has no scale to calibrate in


def test_fit_refuses_when_no_network_has_room():
    with pytest.raises(ValueError, match="room to improve"):
        calibration.fit([500.0], np.full((1, 3), 400.0), np.full((1, 3), 500.0), 500.0, -1, step=0)



def test_prompts_never_go_past_the_best():
    cal = calibration.Calibration(u=list(calibration.GRID), v=[min(0.9, 0.3 + 0.5 * u) for u in calibration.GRID], best=500.0,
                                  networks=1, step=0)
    given = calibration.condition(cal, [10.0, 100.0], [[9.5, 300.0], [90.0, 500.0]], -1)
    assert given.max() <= 500.0 and given[1, 1] == 500.0
    assert given[0, 0] < 9.5  # asking for less than a low start is allowed: it is how CartPole keeps a return


def test_the_fit_keeps_the_branch_where_asking_for_more_delivers_more():
    """Below its start mnist_mlp's G.pt returns better networks when asked for worse ones: that part is
    left out, and a request near the start is asked for at the bottom of the monotone branch."""
    best, start = 0.3, np.full(8, 2.3)
    prompts = calibration.grid_prompts(start, best)
    u = calibration.relative(prompts, start[:, None], best)
    v = np.where(u < 0, 0.45, 0.05 + 0.8 * u)  # garbage that happens to improve, then a monotone response
    cal = calibration.fit(start, prompts, start[:, None] + v * (best - start[:, None]), best, 1, step=0)
    assert min(cal.u) >= 0 and cal.v[0] == pytest.approx(0.05, abs=0.01)
    given = calibration.condition(cal, [2.3], [[2.3 + 0.4 * (best - 2.3)]], 1)  # 40% of the way
    assert calibration.relative(given, 2.3, best)[0, 0] == pytest.approx((0.4 - 0.05) / 0.8, abs=0.03)
    # the part left out is kept for reading: what every prompt of the grid delivered, in the report's plot too
    grid = np.asarray(calibration.GRID)
    np.testing.assert_allclose(cal.delivered, np.where(grid < 0, 0.45, 0.05 + 0.8 * grid), atol=1e-9)
    assert calibration.Calibration(**cal.to_dict()) == cal  # as saved in calibration.json and read back

    from gptpipe.evaluation.report import calibration_plot

    with_grid = calibration_plot(cal.to_dict(), {"model": "m"})
    without = calibration_plot({**cal.to_dict(), "delivered": []}, {"model": "m"})  # saved before the grid was kept
    assert with_grid[:4] == without[:4] == b"\x89PNG" and with_grid != without


def test_the_branch_ends_where_asking_for_less_stops_delivering_less():
    """digits and mnist G.pts: far below the start the answers fall again after the garbage region; the
    branch must stop at the garbage, not at the lowest column."""
    best, start = 0.3, np.full(8, 2.3)
    prompts = calibration.grid_prompts(start, best)
    u = calibration.relative(prompts, start[:, None], best)
    v = np.where(u < -0.6, 0.02, np.where(u < 0, 0.35, 0.05 + 0.8 * u))
    cal = calibration.fit(start, prompts, start[:, None] + v * (best - start[:, None]), best, 1, step=0)
    assert min(cal.u) == 0.0


def test_the_branch_starts_at_the_prompt_that_delivers_most():
    """A CartPole G.pt trained with prompt dropout: asked for the best return it delivers less than asked
    for 7/8 of the way. The calibration's top is that prompt, and a request at the best is asked for as it."""
    best, start = 500.0, np.full(8, 20.0)
    prompts = calibration.grid_prompts(start, best)
    u = calibration.relative(prompts, start[:, None], best)
    v = np.where(u < 0, 0.05, np.where(u > 0.9, 0.87, 0.05 + 0.99 * u))  # 0.91 at u = 7/8, 0.87 at the best
    cal = calibration.fit(start, prompts, start[:, None] + v * (best - start[:, None]), best, -1, step=0)
    assert cal.u[-1] == 0.875 and cal.u[0] == -1.0  # the walk down from 7/8 goes on through the flat start
    given = calibration.condition(cal, [20.0], [[500.0, 20.0 + 0.5 * 480.0]], -1)
    assert calibration.relative(given, 20.0, best)[0, 0] == pytest.approx(0.875)
    assert calibration.relative(given, 20.0, best)[0, 1] == pytest.approx((0.5 - 0.05) / 0.99, abs=0.02)


def test_a_model_trained_with_pairs_that_stay_is_never_prompted_with_its_start():
    """Such a G.pt answers a prompt at exactly its start value with the start itself, a hair away, which
    breaks a knife-edge CartPole policy: its calibration fits the grid without u = 0, and a request at or
    below the start is asked for as a prompt below it, never at it."""
    assert calibration.grid_for("stay") == tuple(u for u in calibration.GRID if u != 0.0)
    assert calibration.grid_for("mixed") == calibration.grid_for(None) == calibration.GRID
    best, start = 500.0, np.repeat([40.0, 300.0], 8)
    grid = calibration.grid_for("stay")
    prompts = calibration.grid_prompts(start, best, grid)
    u = calibration.relative(prompts, start[:, None], best)
    v = np.where(u < 0, 0.05 * (u + 1), 0.3 + 0.6 * u)  # asked for worse: a little better; asked for more: more
    cal = calibration.fit(start, prompts, start[:, None] + v * (best - start[:, None]), best, -1, step=0, grid=grid)
    assert cal.grid == list(grid) and 0.0 not in cal.u and min(cal.u) < 0
    assert calibration.Calibration(**cal.to_dict()) == cal
    saved_before = {k: v for k, v in cal.to_dict().items() if k != "grid"}  # saved before grids were named: GRID's
    assert calibration.still_valid(saved_before, "mixed") == saved_before and calibration.still_valid(saved_before, "stay") is None
    assert calibration.still_valid(cal.to_dict(), "stay") == cal.to_dict() and calibration.still_valid(None, "stay") is None
    requested = np.array([[36.0, 40.0, 45.0], [270.0, 300.0, 310.0]])  # 0.9 x start, the start, a little above
    given = calibration.condition(cal, [40.0, 300.0], requested, -1)
    assert not np.isclose(given, np.array([[40.0], [300.0]])).any()


def test_isotonic_curve_is_scikit_learns_fit():
    """The calibration's fit (scipy's pool-adjacent-violators on tied points merged) reads the same curve
    as scikit-learn's ``IsotonicRegression`` on noisy pairs with ties, inside its range and beyond it."""
    from sklearn.isotonic import IsotonicRegression

    rng = np.random.default_rng(3)
    x = np.repeat(np.linspace(-0.5, 1.0, 7), 9) + np.where(rng.random(63) < 0.3, rng.normal(0, 0.01, 63), 0.0)
    y = np.tanh(2 * x) + rng.normal(0, 0.3, 63)
    at = np.linspace(-0.8, 1.3, 23)
    ours = calibration.isotonic_curve(x, y, at)
    theirs = IsotonicRegression(increasing=True, out_of_bounds="clip").fit(x, y).predict(at)
    assert np.all(np.diff(ours) >= 0) and np.ptp(ours) > 0.5
    np.testing.assert_allclose(ours, theirs, atol=1e-12)
