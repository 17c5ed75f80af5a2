"""The human side of an evaluation: plots, ``report.md`` and the store-wide ``evals/index.md``.

Every number in the report is recomputable from ``results.parquet`` / ``baselines.parquet`` with
``gptpipe catalog`` (the report prints the SQL for its headline numbers).
"""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa

from storage.store import Store


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=110)
    _plt().close(fig)
    return buf.getvalue()


def alignment_plot(rows: dict, summary: dict) -> bytes:
    """Requested vs achieved for every one-step prompt, held-out runs and fresh inits, with y = x."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.2, 5))
    step = np.asarray(rows["step"])
    req, ach, src = np.asarray(rows["requested"]), np.asarray(rows["achieved"]), np.asarray(rows["source"])
    for name, color in (("heldout_run", "tab:blue"), ("fresh_init", "tab:orange")):
        m = (step == 1) & (src == name)
        if m.any():
            ax.scatter(req[m], ach[m], s=8, alpha=0.5, color=color,
                       label=f"{name.replace('_', ' ')}: R² {summary.get(f'r2_{name}', float('nan')):.2f}")
    lo = float(np.nanmin([req.min(), np.nanmin(ach)]))
    hi = float(np.nanmax([req.max(), np.nanpercentile(ach, 99)]))
    ax.plot([lo, hi], [lo, hi], "k--", lw=1, label="achieved = requested")
    ax.set_xlabel(f"requested {summary['metric']}")
    ax.set_ylabel(f"achieved {summary['metric']}")
    ax.set_title(f"Prompt alignment, {summary['model']} (one G.pt step)")
    ax.legend(fontsize=8)
    return _png(fig)


def curves_plot(rows: dict, summary: dict, n: int = 6) -> bytes:
    """A few networks prompted across the range: each line is one start network."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    step, net = np.asarray(rows["step"]), np.asarray(rows["network"])
    req, ach, src = np.asarray(rows["requested"]), np.asarray(rows["achieved"]), np.asarray(rows["source"])
    shown = [k for name in ("heldout_run", "fresh_init") for k in sorted(set(net[(src == name) & (step == 1)]))[: n // 2]]
    for k in shown:
        m = (net == k) & (step == 1)
        order = np.argsort(req[m])
        style = "-" if src[m][0] == "heldout_run" else "--"
        ax.plot(req[m][order], ach[m][order], style, marker="o", ms=3, label=f"network {k} ({src[m][0].replace('_', ' ')})")
    lo, hi = req.min(), req.max()
    ax.plot([lo, hi], [lo, hi], "k:", lw=1)
    ax.set_xlabel(f"requested {summary['metric']}")
    ax.set_ylabel(f"achieved {summary['metric']}")
    ax.set_title("Prompting across a range of values")
    ax.legend(fontsize=7)
    return _png(fig)


def one_step_plot(summary: dict, metric: str) -> bytes:
    """Fresh random inits: the start, one G.pt update, SGD after 1 and 25 epochs, recursive updates."""
    plt = _plt()
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.8))
    labels = ["start", "G.pt 1 step", "SGD 1 epoch", "SGD 25 epochs"]
    values = [summary[f"start_{metric}_mean"], summary[f"one_step_best_prompt_{metric}_mean"],
              summary[f"sgd_1_epoch_{metric}_mean"], summary[f"sgd_25_epochs_{metric}_mean"]]
    a.bar(labels, values, color=["grey", "tab:orange", "tab:blue", "tab:blue"])
    for i, v in enumerate(values):
        a.text(i, v, f"{v:.3g}", ha="center", va="bottom", fontsize=8)
    a.set_ylabel(f"mean {metric} (fresh inits)")
    a.set_title("One update from a random init")
    a.tick_params(axis="x", labelsize=8)
    rec = summary[f"recursive_{metric}_mean"]
    b.plot(range(1, len(rec) + 1), rec, marker="o", color="tab:orange", label="G.pt, prompted with the best value")
    b.axhline(summary[f"sgd_25_epochs_{metric}_mean"], color="tab:blue", ls="--", label="SGD 25 epochs")
    b.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
    b.set_xlabel("G.pt updates")
    b.set_ylabel(f"mean {metric}")
    b.set_title("Recursive prompting")
    b.legend(fontsize=8)
    return _png(fig)


def markdown(summary: dict) -> str:
    m = summary["metric"]
    e = summary["eval"]
    lines = [
        f"# Evaluation `{e}` of G.pt `{summary['model']}`",
        "",
        f"Problem `{summary['problem']}`, prompted metric `{m}`; sweeps {', '.join(summary['sweeps'])} "
        f"(catalog digest `{summary['catalog_digest'][:12]}`); model step {summary['model_step']}; "
        f"sampler {summary['sampler']} with {summary['sample_steps']} step(s); code {summary['code_version']}; "
        f"{summary['networks']} start networks × {summary['prompts']} prompts from the best value in the sweeps "
        f"({summary['best_in_sweeps']:.4g}) to 0.9 × each start value; {summary['eval_wall_s']} s.",
        "",
        "| | held-out runs | fresh inits | all |",
        "|---|---|---|---|",
        "| prompt alignment R² | " + " | ".join(f"{summary.get(f'r2_{k}', float('nan')):.3f}" for k in ("heldout_run", "fresh_init", "all")) + " |",
        "| Pearson | " + " | ".join(f"{summary.get(f'pearson_{k}', float('nan')):.3f}" for k in ("heldout_run", "fresh_init", "all")) + " |",
        "",
        "![alignment](alignment.png)",
        "",
        "![curves](curves.png)",
        "",
        "## One update from a random init (fresh inits, prompted with the best value)",
        "",
        "| metric | start | G.pt 1 step (mean) | G.pt 1 step (best) | SGD 1 epoch | SGD 25 epochs |",
        "|---|---|---|---|---|---|",
    ]
    for metric in sorted({k[len("one_step_best_prompt_"): -len("_mean")] for k in summary if k.startswith("one_step_best_prompt_") and k.endswith("_mean")}):
        lines.append(f"| {metric} | {summary[f'start_{metric}_mean']:.4g} | {summary[f'one_step_best_prompt_{metric}_mean']:.4g} | "
                     f"{summary[f'one_step_best_prompt_{metric}_min']:.4g} | {summary[f'sgd_1_epoch_{metric}_mean']:.4g} | "
                     f"{summary[f'sgd_25_epochs_{metric}_mean']:.4g} |")
    lines += [
        "",
        f"![one step](one_step_{m}.png)",
        "",
        "SGD baselines start from the same networks with the sweep's recipe at the learning rate of its best run.",
        "",
        "## Recompute these numbers",
        "",
        "```",
        f"gptpipe catalog \"select source, count(*) as rows, corr(requested, achieved) as pearson from evaluations where eval = '{e}' and step = 1 group by source\"",
        f"gptpipe catalog \"select step, avg(test_error) as mean_test_error from evaluations where eval = '{e}' and source = 'fresh_init' and requested = (select min(requested) from evaluations where eval = '{e}') group by step order by step\"",
        "```",
        "",
        "R² per network is 1 − Σ(requested − achieved)² / Σ(requested − mean requested)², averaged over networks.",
    ]
    return "\n".join(lines) + "\n"


def write(store: Store, eval_name: str, summary: dict, results: pa.Table, baselines: pa.Table) -> None:
    rows = results.to_pydict()
    store.write_bytes(alignment_plot(rows, summary), "evals", eval_name, "alignment.png")
    store.write_bytes(curves_plot(rows, summary), "evals", eval_name, "curves.png")
    for metric in ("test_loss", "test_error", summary["metric"]):
        if f"start_{metric}_mean" in summary:
            store.write_bytes(one_step_plot(summary, metric), "evals", eval_name, f"one_step_{metric}.png")
    store.write_bytes(markdown(summary).encode(), "evals", eval_name, "report.md")


def write_index(store: Store) -> str:
    """``evals/index.md``: every evaluation with its headline numbers, newest first."""
    summaries = []
    for name in store.ls("evals"):
        if store.exists("evals", name, "summary.json") and store.exists("evals", name, "results.parquet"):
            summaries.append(store.read_json("evals", name, "summary.json"))
    summaries.sort(key=lambda s: s.get("created_at", ""), reverse=True)
    lines = ["# Evaluations", "", "| eval | created | model | step | R² held-out | R² fresh | 1-step test error | SGD 1 epoch |",
             "|---|---|---|---|---|---|---|---|"]
    for s in summaries:
        lines.append(f"| [{s['eval']}]({s['eval']}/report.md) | {s.get('created_at', '')[:16]} | {s['model']} | {s.get('model_step')} | "
                     f"{s.get('r2_heldout_run', float('nan')):.3f} | {s.get('r2_fresh_init', float('nan')):.3f} | "
                     f"{s.get('one_step_best_prompt_test_error_mean', float('nan')):.3f} | {s.get('sgd_1_epoch_test_error_mean', float('nan')):.3f} |")
    text = "\n".join(lines) + "\n"
    store.write_bytes(text.encode(), "evals", "index.md")
    return text
