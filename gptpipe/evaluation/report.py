"""The human side of an evaluation (no I/O): its plots and ``report.md`` (pages.py makes them into pages).

Every number in the report is recomputable from ``results.parquet`` / ``baselines.parquet`` with
``gptpipe catalog`` (the report prints the SQL for its headline numbers).
"""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa

from gptpipe.evaluation.calibration import GRID

# One colour per source in every plot and page, readable on white and on the Prefect UI's dark theme
# (plots carry their own white background).
COLORS = {"gpt": "tab:orange", "heldout": "tab:purple", "fresh": "tab:orange", "recipe": "tab:blue", "adam": "tab:green",
          "start": "dimgrey", "copies": "grey", "bad": "tab:red"}
METRIC_LABELS = {"test_loss": "test loss (cross-entropy, nats)", "train_loss": "train loss (cross-entropy, nats)",
                 "test_error": "test error (fraction wrong)", "train_error": "train error (fraction wrong)",
                 "return": "return (steps balanced, max 500)"}


def metric_label(metric: str) -> str:
    """``metric`` with its unit, for an axis."""
    return METRIC_LABELS.get(metric, metric)


def plt_module():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def png(fig) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=110)
    plt_module().close(fig)
    return buf.getvalue()


def loss_plot(losses: list[float], title: str) -> bytes:
    """The training curve of G.pt ``title``: every step and a running mean, log scale."""
    plt = plt_module()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    y = np.asarray(losses, dtype=float)
    if len(y):
        ax.plot(np.arange(1, len(y) + 1), y, lw=0.5, alpha=0.4, label="step")
        w = max(1, len(y) // 50)
        ax.plot(np.arange(w, len(y) + 1), np.convolve(y, np.ones(w) / w, mode="valid"), lw=1.5, label=f"mean of {w}")
        ax.set_yscale("log")
    ax.set_xlabel("training step")
    ax.set_ylabel("diffusion loss")
    ax.set_title(f"Training loss of G.pt {title}")
    ax.legend()
    return png(fig)


def alignment_plot(rows: dict, summary: dict) -> bytes:
    """Requested vs achieved for every one-step prompt, held-out runs and fresh inits, with y = x."""
    plt = plt_module()
    fig, ax = plt.subplots(figsize=(5.2, 5))
    step = np.asarray(rows["step"])
    grid = (step == 1) & (np.asarray(rows["sample"]) == 0)
    req, ach, src = np.asarray(rows["requested"]), np.asarray(rows["achieved"]), np.asarray(rows["source"])
    for name, color in (("heldout_run", COLORS["heldout"]), ("fresh_init", COLORS["fresh"])):
        m = grid & (src == name)
        if m.any():
            ax.scatter(req[m], ach[m], s=8, alpha=0.5, color=color,
                       label=f"{name.replace('_', ' ')}: R² {summary.get(f'r2_{name}', float('nan')):.2f}")
    lo = float(np.nanmin([req.min(), np.nanmin(ach)]))
    hi = float(np.nanmax([req.max(), np.nanpercentile(ach, 99)]))
    ax.plot([lo, hi], [lo, hi], "k--", lw=1, label="achieved = requested")
    ax.set_xlabel(f"requested {metric_label(summary['metric'])}")
    ax.set_ylabel(f"achieved {metric_label(summary['metric'])}")
    ax.set_title(f"Prompt alignment, {summary['model']} (one G.pt step)")
    ax.legend(fontsize=8)
    return png(fig)


def calibration_plot(calibration: dict, summary: dict) -> bytes:
    """The prompt calibration: what G.pt delivers on the calibration networks for each prompt, as
    fractions of the way from the start to the best value, against y = x."""
    plt = plt_module()
    fig, ax = plt.subplots(figsize=(5.2, 4.4))
    u, v = np.asarray(calibration["u"]), np.asarray(calibration["v"])
    delivered = np.array([np.nan if d is None else d for d in calibration.get("delivered", [])], np.float64)
    lo = u.min()
    grid = calibration.get("grid", GRID)
    if len(delivered) == len(grid):  # calibrations saved before the grid's answers were kept have none
        ax.plot(grid, delivered, "o", ms=4, mfc="none", color="0.55", label="mean delivery, every prompt of the grid")
        lo = min(lo, grid[0])
    ax.plot(u, v, "o-", ms=3, color=COLORS["gpt"], label="fitted on its monotone branch")
    ax.plot([lo, 1], [lo, 1], "k--", lw=1, label="delivered = asked")
    ax.axvline(0, color=COLORS["start"], lw=0.8)
    ax.set_xlabel("prompt: fraction of the way from the start to the best value")
    ax.set_ylabel("delivered: same fraction")
    ax.set_title(f"Prompt calibration, {summary['model']} at step {calibration['step']}\n"
                 f"(isotonic fits, {calibration['networks']} networks)", fontsize=10)
    ax.legend(fontsize=8)
    return png(fig)


def curves_plot(rows: dict, summary: dict, n: int = 6) -> bytes:
    """A few networks prompted across the range: each line is one start network."""
    plt = plt_module()
    fig, ax = plt.subplots(figsize=(6, 4))
    grid = (np.asarray(rows["step"]) == 1) & (np.asarray(rows["sample"]) == 0)
    net = np.asarray(rows["network"])
    req, ach, src = np.asarray(rows["requested"]), np.asarray(rows["achieved"]), np.asarray(rows["source"])
    shown = [k for name in ("heldout_run", "fresh_init") for k in sorted(set(net[(src == name) & grid]))[: n // 2]]
    for k in shown:
        m = (net == k) & grid
        order = np.argsort(req[m])
        style = "-" if src[m][0] == "heldout_run" else "--"
        ax.plot(req[m][order], ach[m][order], style, marker="o", ms=3, label=f"network {k} ({src[m][0].replace('_', ' ')})")
    lo, hi = req.min(), req.max()
    ax.plot([lo, hi], [lo, hi], "k:", lw=1)
    ax.set_xlabel(f"requested {metric_label(summary['metric'])}")
    ax.set_ylabel(f"achieved {metric_label(summary['metric'])}")
    ax.set_title("Prompting across a range of values (solid: held-out runs, dashed: fresh inits)")
    ax.legend(fontsize=7)
    return png(fig)


def one_step_plot(summary: dict, metric: str) -> bytes:
    """Fresh random inits: the start, one G.pt update, the sweep's recipe (SGD; PPO for cartpole, where an
    epoch is a PPO iteration) after 1 and 25 epochs, recursive updates."""
    plt = plt_module()
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.8))
    labels = ["start", "G.pt 1 step", "recipe 1 epoch", "recipe 25 epochs"]
    values = [summary[f"start_{metric}_mean"], summary[f"one_step_best_prompt_{metric}_mean"],
              summary[f"sgd_1_epoch_{metric}_mean"], summary[f"sgd_25_epochs_{metric}_mean"]]
    a.bar(labels, values, color=[COLORS["start"], COLORS["gpt"], COLORS["recipe"], COLORS["recipe"]])
    for i, v in enumerate(values):
        a.text(i, v, f"{v:.3g}", ha="center", va="bottom", fontsize=8)
    a.set_ylabel(f"mean {metric_label(metric)}\n(fresh inits)")
    a.set_title("One update from a random init")
    a.tick_params(axis="x", labelsize=8)
    rec = summary[f"recursive_{metric}_mean"]
    b.plot(range(1, len(rec) + 1), rec, marker="o", color=COLORS["gpt"], label="G.pt, prompted with the best value")
    b.axhline(summary[f"sgd_25_epochs_{metric}_mean"], color=COLORS["recipe"], ls="--", label="recipe 25 epochs")
    b.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
    b.set_xlabel("G.pt updates")
    b.set_ylabel(f"mean {metric_label(metric)}")
    b.set_title("Recursive prompting")
    b.legend(fontsize=8)
    return png(fig)


def optimiser_plot(summary: dict, metric: str) -> bytes:
    """SGD and Adam from the same fresh inits, against optimiser steps; G.pt's one update as a line."""
    plt = plt_module()
    fig, ax = plt.subplots(figsize=(6, 4))
    steps = np.asarray(summary["optimiser_steps"], dtype=float)
    x = np.where(steps == 0, 0.5, steps)  # log axis: step 0 drawn at 0.5
    for name, color in (("sgd", COLORS["recipe"]), ("adam", COLORS["adam"])):
        ax.plot(x, summary[f"{name}_curve_{metric}_mean"], marker="o", ms=3, color=color,
                label=f"{name.upper()} (lr {summary['best_lr' if name == 'sgd' else 'adam_lr']:.3g})")
    ax.axhline(summary[f"one_step_best_prompt_{metric}_mean"], color=COLORS["gpt"], lw=2, label="G.pt, one update")
    ax.axhline(summary["sweep_best"], color=COLORS["copies"], ls=":", label="best checkpoint in the sweep")
    ax.set_xscale("log")
    ax.set_xlabel("optimiser steps (batch 128; 0 drawn at 0.5)")
    ax.set_ylabel(f"mean {metric_label(metric)} (fresh inits)")
    ax.set_title("One G.pt update vs optimiser steps")
    ax.legend(fontsize=8)
    return png(fig)


def diversity_plot(diversity: dict, rows: dict, metric: str) -> bytes:
    """Several samples for the same (network, best prompt): what each achieves, and how far apart
    the samples are compared with how far they moved from the start."""
    plt = plt_module()
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.8))
    net, sample, step = np.asarray(rows["network"]), np.asarray(rows["sample"]), np.asarray(rows["step"])
    req, ach = np.asarray(rows["requested"]), np.asarray(rows["achieved"])
    best = diversity["requested"]
    pairwise, moved = [], []
    for i, n in enumerate(diversity["nets"]):
        m = (net == n) & (step == 1) & np.isclose(req, best, rtol=1e-6)
        a.scatter(np.full(m.sum(), i), ach[m], s=14)
        samples = np.concatenate([diversity["first"][i][None], diversity["extra"][i]])
        d = np.linalg.norm(samples[:, None] - samples[None], axis=-1)
        pairwise += d[np.triu_indices(len(samples), 1)].tolist()
        moved += np.linalg.norm(samples - diversity["start"][i], axis=1).tolist()
    a.axhline(best, color="k", ls="--", lw=1, label="requested")
    a.set_xticks(range(len(diversity["nets"])), [f"net {n}" for n in diversity["nets"]])
    a.set_ylabel(f"achieved {metric_label(metric)}")
    a.set_title("Samples for the same prompt")
    a.legend(fontsize=8)
    b.hist(pairwise, bins=20, alpha=0.7, color=COLORS["gpt"], label="between samples")
    b.hist(moved, bins=20, alpha=0.7, color=COLORS["start"], label="sample to its start")
    b.set_xlabel("parameter distance (L2)")
    b.set_title("Distinct solutions?")
    b.legend(fontsize=8)
    return png(fig)


def landscape_plot(landscape: dict, diversity: dict, metric: str) -> bytes:
    """The metric over the sweep's top-2 principal directions, with starts and samples drawn on it."""
    plt = plt_module()
    fig, ax = plt.subplots(figsize=(6, 5))
    cs = ax.contourf(landscape["a"], landscape["b"], landscape["values"], levels=20, cmap="viridis")
    fig.colorbar(cs, ax=ax, label=metric_label(metric))
    ax.scatter(*landscape["train"].T, s=1, c="white", alpha=0.15, label="training checkpoints")
    n = len(diversity["nets"])
    pts = landscape["points"]
    starts, firsts, extra = pts[:n], pts[n : 2 * n], pts[2 * n :].reshape(n, -1, 2)
    for i in range(n):
        color = plt.cm.tab10(i)
        ax.scatter(*starts[i], marker="x", s=60, color=color)
        samples = np.concatenate([firsts[i][None], extra[i]])
        ax.scatter(*samples.T, s=18, color=color, edgecolor="k", lw=0.5)
        for p in samples:
            ax.plot([starts[i][0], p[0]], [starts[i][1], p[1]], color=color, lw=0.5, alpha=0.6)
    ax.set_xlabel("principal direction 1")
    ax.set_ylabel("principal direction 2")
    ax.set_title(f"{metric} landscape: starts (x) and G.pt samples (o)")
    return png(fig)


def first_layer_images(layers, theta) -> np.ndarray | None:
    """The first layer's weights of each network as images, where they are image-like; else None.

    ``layers``: ``[(name, shape), ...]`` in flat order (a problem's ``layers`` or ``[name, shape]`` pairs);
    ``theta [F, P]``. A linear layer ``[units, d]`` on square images (d = s², s >= 5: digits 8×8, MNIST
    28×28) gives ``[F, units, s, s]`` (each hidden unit's input weights); a convolution
    ``[out, 3, kh, kw]`` gives RGB filters ``[F, out, kh, kw, 3]`` and ``[out, 1, kh, kw]`` grey ones."""
    name, shape = (layers[0].name, tuple(layers[0].shape)) if hasattr(layers[0], "name") else (layers[0][0], tuple(layers[0][1]))
    theta = np.asarray(theta, dtype=np.float32)
    n = int(np.prod(shape))
    w = theta[:, :n].reshape(len(theta), *shape)
    if len(shape) == 2:
        side = int(round(np.sqrt(shape[1])))
        if side >= 5 and side * side == shape[1]:
            return w.reshape(len(theta), shape[0], side, side)
        return None
    if len(shape) == 4 and shape[1] == 3:
        return np.moveaxis(w, 2, -1)  # [F, out, kh, kw, 3]
    if len(shape) == 4 and shape[1] == 1:
        return w[:, :, 0]
    return None


def latent_walk_plot(images: np.ndarray, values: np.ndarray, metric: str, max_units: int = 16) -> bytes:
    """Rows: frames of a latent walk (noise slerped between two draws, same start and prompt); columns:
    the first layer's units drawn as images; each unit keeps one colour scale across frames.

    The frames are tiled into one mosaic on one axis (a grid of F x U small axes took seconds of every
    evaluation to lay out)."""
    plt = plt_module()
    F, U = images.shape[:2]
    U = min(U, max_units)
    h, w = images.shape[2:4]
    gap = max(1, h // 8)
    mosaic = np.ones((F * (h + gap) - gap, U * (w + gap) - gap, 3))  # white between tiles
    seismic = plt.get_cmap("seismic")
    for u in range(U):
        unit = images[:, u].astype(np.float64)
        if images.ndim == 5:  # RGB filters: min-max scaled
            lo, hi = unit.min(), unit.max()
            tiles = (unit - lo) / max(hi - lo, 1e-8)
        else:  # signed weights: symmetric scale, white at zero
            vmax = max(float(np.abs(unit).max()), 1e-8)
            tiles = seismic((unit / vmax + 1) / 2)[..., :3]
        for f in range(F):
            mosaic[f * (h + gap):f * (h + gap) + h, u * (w + gap):u * (w + gap) + w] = tiles[f]
    fig, ax = plt.subplots(figsize=(0.75 * U + 1.2, 0.75 * F + 0.6))
    ax.imshow(mosaic, interpolation="nearest")
    ax.set_xticks([u * (w + gap) + (w - 1) / 2 for u in range(U)], [f"unit {u}" for u in range(U)], fontsize=6)
    ax.xaxis.tick_top()
    ax.set_yticks([f * (h + gap) + (h - 1) / 2 for f in range(F)], [f"{v:.3g}" for v in values[:F]], fontsize=7)
    ax.tick_params(length=0)
    for side in ax.spines.values():
        side.set_visible(False)
    fig.suptitle(f"Latent walk: first-layer weights per frame (row label: achieved {metric})", fontsize=8)
    return png(fig)


def nn_plot(nn: dict, summary: dict) -> bytes:
    """The memorisation picture (Zeng et al. 2025, who found published weight generators mostly copy
    their training checkpoints). Left: distance to the nearest training checkpoint, G.pt's samples
    against held-out runs' own, final and at the samples' level. Right: the metric against that distance, every G.pt
    sample against the best training checkpoints plus noise at several scales: a copier sits on the
    noise curve, a model that learned the task beats it at the same distance."""
    metric, copies = summary["metric"], summary["copies_plus_noise"]
    plt = plt_module()
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
    a.hist(nn["generated"], bins=20, alpha=0.7, color=COLORS["gpt"], label="G.pt samples (best prompt)")
    a.hist(nn["heldout_final"], bins=20, alpha=0.7, color=COLORS["heldout"], label="held-out runs' final checkpoints")
    a.hist(nn["heldout_at_level"], bins=20, histtype="step", linewidth=1.5, color=COLORS["heldout"],
           label="held-out runs' checkpoints at the samples' level")
    a.set_xlabel("distance to the nearest training checkpoint (L2 over all parameters)")
    a.set_ylabel("networks")
    a.set_title("How far from the training checkpoints?")
    a.legend(fontsize=8)
    b.scatter(nn["generated"], nn["generated_values"], s=10, alpha=0.6, color=COLORS["gpt"], label="G.pt samples (best prompt)")
    b.plot([c["distance"] for c in copies], [c[metric] for c in copies], "o-", color=COLORS["copies"],
           label="best training checkpoints + noise")
    b.set_xlabel("distance from a training checkpoint (L2 over all parameters)")
    b.set_ylabel(metric_label(metric))
    b.set_title("Better than copies plus noise at the same distance?")
    b.legend(fontsize=8)
    return png(fig)


def sampling_note(summary: dict) -> str:
    """What the header says of guidance and temperature when they are not 1."""
    guidance, temperature = summary.get("guidance", 1.0), summary.get("temperature", 1.0)
    return ((f", classifier-free guidance {guidance:g}" if guidance != 1.0 else "")
            + (f", starting noise at temperature {temperature:g}" if temperature != 1.0 else ""))


def _header(summary: dict) -> list[str]:
    m, r = summary["metric"], lambda k: f"{summary.get(k, float('nan')):.3f}"
    return [
        f"# Evaluation `{summary['eval']}` of G.pt `{summary['model']}`",
        "",
        f"Problem `{summary['problem']}`, prompted metric `{m}`; sweeps {', '.join(summary['sweeps'])} "
        f"(catalog digest `{summary['catalog_digest'][:12]}`); model step {summary['model_step']}; "
        f"sampler {summary['sampler']} with {summary['sample_steps']} step(s)"
        f"{sampling_note(summary)}; code {summary['code_version']}; "
        f"{summary['networks']} start networks × {summary['prompts']} prompts from the best value in the sweeps "
        f"({summary['best_in_sweeps']:.4g}) to 0.9 × each start value; {summary['eval_wall_s']} s.",
        "",
        "| | held-out runs | fresh inits | all |",
        "|---|---|---|---|",
        "| prompt alignment R² (mean over networks) | " + " | ".join(r(f"r2_{k}") for k in ("heldout_run", "fresh_init", "all")) + " |",
        "| median network's R² | " + " | ".join(r(f"r2_median_{k}") for k in ("heldout_run", "fresh_init", "all")) + " |",
        "| Pearson | " + " | ".join(r(f"pearson_{k}") for k in ("heldout_run", "fresh_init", "all")) + " |",
        "",
        "![alignment](alignment.png)",
        "",
        "![curves](curves.png)",
        "",
        *_calibration(summary),
    ]


def _calibration(summary: dict) -> list[str]:
    if not summary.get("calibration"):
        return ["G.pt was prompted with the requested values themselves (no calibration).", ""]
    return [
        "G.pt was prompted through its calibration: for each request, the prompt that delivered it on average on "
        f"{summary['calibration']['networks']} fresh inits of the calibration's own (never these start networks); "
        "`results.prompted` holds what G.pt was given, `results.requested` what was asked. "
        "`gptpipe evaluate --no-calibration` prompts with the requests themselves.",
        "",
        "![calibration](calibration.png)",
        "",
    ]


def _one_step(summary: dict) -> list[str]:
    m = summary["metric"]
    lines = [
        "## One update from a random init (fresh inits, prompted with the best value)",
        "",
        "The recipe columns train the same start networks with the sweep's own recipe at its best run's learning "
        "rate (SGD; PPO for cartpole, where an epoch is a PPO iteration).",
        "",
        "| metric | start | G.pt 1 step (mean) | G.pt 1 step (best) | recipe 1 epoch | recipe 25 epochs | "
        "G.pt 1 step / recipe 25 epochs (± standard error) |",
        "|---|---|---|---|---|---|---|",
    ]
    prefix, suffix = "one_step_best_prompt_", "_mean"
    for metric in sorted({k[len(prefix): -len(suffix)] for k in summary if k.startswith(prefix) and k.endswith(suffix)}):
        lines.append(f"| {metric} | {summary[f'start_{metric}_mean']:.4g} | {summary[f'one_step_best_prompt_{metric}_mean']:.4g} | "
                     f"{summary[f'one_step_best_prompt_{metric}_best']:.4g} | {summary[f'sgd_1_epoch_{metric}_mean']:.4g} | "
                     f"{summary[f'sgd_25_epochs_{metric}_mean']:.4g} | {ratio_to_recipe(summary, metric)} |")
    lines.append("")
    for shown in plotted_metrics(summary):
        lines += [f"![one step, {shown}](one_step_{shown}.png)", ""]
        if f"sgd_curve_{shown}_mean" in summary:  # optimiser curves need a differentiable training loss (not RL)
            lines += [f"![optimisers, {shown}](optimisers_{shown}.png)", ""]
    if f"sgd_curve_{m}_mean" in summary:
        longest = max(summary["optimiser_steps"])
        lines += [f"Steps to match G.pt's one update ({m}): SGD {_steps(summary.get('sgd_steps_to_match_one_step'), longest)}, "
                  f"Adam {_steps(summary.get('adam_steps_to_match_one_step'), longest)} (constant learning rate, batch 128).", ""]
    return lines


def ratio_to_recipe(summary: dict, metric: str) -> str:
    """G.pt's one step over the recipe's 25 epochs, paired over the same fresh inits ("n/a" in evaluations
    from before it was recorded, or where the recipe's mean is 0)."""
    ratio = summary.get(f"one_step_over_recipe_{metric}", float("nan"))
    if ratio != ratio:
        return "n/a"
    se = summary[f"one_step_over_recipe_{metric}_se"]
    return f"{ratio:.3g}×" + (f" ± {se:.2g}" if se == se else "")  # one fresh init: no standard error


def plotted_metrics(summary: dict) -> list[str]:
    """The metrics the one-update plots are drawn in: loss and error for classifiers, else the prompted one."""
    return [m for m in dict.fromkeys(("test_loss", "test_error", summary["metric"])) if f"start_{m}_mean" in summary]


def _diversity_and_checks(summary: dict) -> list[str]:
    m = summary["metric"]
    return [
        "## Diversity",
        "",
        f"{summary['diversity_samples']} samples for each of {summary['diversity_networks']} fresh inits at the best prompt.",
        "",
        "![diversity](diversity.png)",
        "",
        "![landscape](landscape.png)",
        "",
        "## Honesty checks",
        "",
        "| | value |",
        "|---|---|",
        f"| best checkpoint in the sweep ({m}) | {summary['sweep_best']:.4g} |",
        f"| mean final checkpoint in the sweep ({m}) | {summary['sweep_mean_final']:.4g} |",
        f"| good training checkpoints + 5% noise ({m}, mean) | {summary.get(f'noisy_checkpoint_{m}_mean', float('nan')):.4g} |",
        f"| G.pt one update, best prompt ({m}, mean over fresh inits) | {summary[f'one_step_best_prompt_{m}_mean']:.4g} |",
        f"| median distance of G.pt samples to the nearest training checkpoint | {summary['nn_distance_generated_median']:.4g} |",
        f"| the same for held-out runs' final checkpoints (reference) | {summary['nn_distance_heldout_final_median']:.4g} |",
        f"| the same for held-out runs' checkpoints closest to the samples' median {m} (reference at the same level) | "
        f"{summary['nn_distance_heldout_at_level_median']:.4g} |",
        f"| G.pt samples, best prompt ({m}, mean over all start networks) | {summary['generated_best_prompt_mean']:.4g} |",
        f"| best training checkpoints + noise at the samples' median distance ({m}, mean) | "
        f"{summary[f'copies_plus_noise_{m}_at_generated_distance']:.4g} |",
        "",
        "![memorisation](nearest_neighbour.png)",
        "",
    ]


def _walk_and_lineage(summary: dict) -> list[str]:
    m, e = summary["metric"], summary["eval"]
    lines = []
    if summary.get("latent_walk_frames"):
        lines += ["## Latent walk", "",
                  f"One fresh init prompted with the best value; the initial noise slerped between two draws in "
                  f"{summary['latent_walk_frames']} frames, each sampled deterministically (DDIM, {summary['latent_walk_steps']} steps). "
                  f"Achieved {m} along the walk: {', '.join(f'{v:.3g}' for v in summary['latent_walk_values'])}.", "",
                  "![latent walk](latent_walk.png)", ""]
    return lines + [
        "## Lineage",
        "",
        f"Model `{summary['model']}` at step {summary['model_step']} (training {summary.get('train_wall_s')} s); sweeps "
        f"{', '.join(summary['sweeps'])} (collect compute {summary.get('collect_compute_s', 0):.0f} s); catalog digest "
        f"`{summary['catalog_digest']}`; code {summary['code_version']}; {summary['machine']}; evaluation {summary['eval_wall_s']} s "
        f"(sampling {summary.get('sampling_s')} s, baselines {summary.get('baselines_s')} s, checks {summary.get('checks_s')} s).",
        "",
        "## Recompute these numbers",
        "",
        "```",
        f"gptpipe catalog \"select source, count(*) as rows, corr(requested, achieved) as pearson from evaluations where eval = '{e}' and step = 1 and sample = 0 group by source\"",
        f"gptpipe catalog \"select step, avg(test_error) as mean_test_error from evaluations where eval = '{e}' and source = 'fresh_init' and sample = 0 and requested = (select min(requested) from evaluations where eval = '{e}') group by step order by step\"",
        f"gptpipe catalog \"select optimiser, epochs, steps, avg({m}) from baselines where eval = '{e}' and source = 'fresh_init' group by all order by all\"",
        "```",
        "",
        "R² per network is 1 − Σ(requested − achieved)² / Σ(requested − mean requested)², averaged over networks.",
    ]


def markdown(summary: dict) -> str:
    """``report.md``: the headline table, then one section per question a reader asks, plots inline."""
    return "\n".join(_header(summary) + _one_step(summary) + _diversity_and_checks(summary) + _walk_and_lineage(summary)) + "\n"


def _steps(n, longest: int) -> str:
    return f"{n} steps" if n is not None else f"more than {longest} steps"


def render(summary: dict, results: pa.Table, landscape: dict, diversity: dict, nn: dict, walk: dict | None = None) -> dict[str, bytes]:
    """Every file of the report, name -> bytes: the plots and ``report.md``."""
    rows = results.to_pydict()
    metric = summary["metric"]
    files = {"alignment.png": alignment_plot(rows, summary), "curves.png": curves_plot(rows, summary)}
    if summary.get("calibration"):
        files["calibration.png"] = calibration_plot(summary["calibration"], summary)
    for m in plotted_metrics(summary):
        files[f"one_step_{m}.png"] = one_step_plot(summary, m)
        if f"sgd_curve_{m}_mean" in summary:
            files[f"optimisers_{m}.png"] = optimiser_plot(summary, m)
    if len(diversity["nets"]):
        files["diversity.png"] = diversity_plot(diversity, rows, metric)
        files["landscape.png"] = landscape_plot(landscape, diversity, "test_error" if "test_error" in rows else metric)
    files["nearest_neighbour.png"] = nn_plot(nn, summary)
    if walk is not None:
        files["latent_walk.png"] = latent_walk_plot(walk["images"], walk["values"], metric)
    files["report.md"] = markdown(summary).encode()
    return files
