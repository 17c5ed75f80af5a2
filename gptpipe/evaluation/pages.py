"""Pages people open (no I/O): markdown with its pictures inside, self-contained HTML, the evaluations
index with its trend, a model's card, a sweep at a glance.

Reports are written as ``report.md`` with plots beside it (``![x](x.png)``). Wherever the markdown is
shown away from those files (a Prefect artifact, an ``s3://`` store, a copied folder) a relative image
is a broken one, so every page here carries its images as ``data:`` URIs: ``inline_images`` for
markdown (artifacts, with images shrunk to keep the API payload small), ``html_page`` for the HTML
files in the store (full-size images, readable offline).
"""

from __future__ import annotations

import base64
import html
import io
import re

import markdown as markdown_lib
import numpy as np

from gptpipe.evaluation.report import COLORS, metric_label, plt_module, png, ratio_to_recipe

IMAGE = re.compile(r"!\[([^\]]*)\]\(([^)\s]+\.png)\)")
ARTIFACT_IMAGE_WIDTH = 720  # pixels: as wide as the Prefect UI's artifact column


def compact_png(data: bytes, max_width: int = ARTIFACT_IMAGE_WIDTH) -> bytes:
    """``data`` scaled down to ``max_width`` and cut to a 256-colour palette (plots have few colours):
    still sharp on screen, ~40% of the bytes of a test-sized report's images (fast octree: 0.27 s for
    its eleven, against 1.4 s and 1.5x the bytes for median cut with ``optimize``)."""
    from PIL import Image

    img = Image.open(io.BytesIO(data)).convert("RGB")
    if img.width > max_width:
        img = img.resize((max_width, round(img.height * max_width / img.width)), Image.LANCZOS)
    out = io.BytesIO()
    img.quantize(colors=256, method=Image.Quantize.FASTOCTREE).save(out, format="PNG")
    return out.getvalue()


def data_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def inline_images(text: str, files: dict[str, bytes]) -> str:
    """``text`` (markdown) with every ``![alt](name.png)`` whose file is in ``files`` replaced by the image
    itself, shrunk for an artifact (``compact_png``)."""

    def swap(m: re.Match) -> str:
        data = files.get(m.group(2))
        if data is None:
            return m.group(0)
        return f"![{m.group(1)}]({data_uri(compact_png(data))})"

    return IMAGE.sub(swap, text)


STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #1a1a1a; background: #fff; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.92em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: left; }
th { background: #f2f2f2; }
img { max-width: 100%; display: block; margin: 0.8em 0; }
code, pre { background: #f5f5f5; font-size: 0.9em; }
pre { padding: 0.8em; overflow-x: auto; }
"""


def html_page(title: str, text: str, files: dict[str, bytes] | None = None) -> bytes:
    """One self-contained HTML file from markdown ``text``: its images (from ``files``) inside, no
    outside reference, so it opens the same from any store or a downloaded copy."""
    body = markdown_lib.markdown(text, extensions=["tables", "fenced_code"])
    # the images go in after the conversion: markdown's inline patterns run over base64 text made a
    # test-sized report's page 0.49 s instead of 0.11 s
    for name, data in (files or {}).items():
        body = body.replace(f'src="{name}"', f'src="{data_uri(data)}"')
    return (f"<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{STYLE}</style></head>\n<body>\n{body}\n</body></html>\n").encode()


def shown_metric(summary: dict) -> str:
    """The metric an evaluation's headline is read in: test error for classifiers, else the prompted one."""
    return "test_error" if "one_step_best_prompt_test_error_mean" in summary else summary.get("metric", "test_loss")


def trend_plot(summaries: list[dict]) -> bytes:
    """Every evaluation in time order: prompt alignment (left) and the one-update result against the
    recipe's first epoch (right), one line per model, so a nightly schedule reads as a trend."""
    plt = plt_module()
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
    ordered = sorted(summaries, key=lambda s: s.get("created_at", ""))
    models = list(dict.fromkeys(s["model"] for s in ordered))
    markers = "osD^v<>p*h"
    nan = float("nan")
    for k, model in enumerate(models):
        mine = [(i, s) for i, s in enumerate(ordered) if s["model"] == model]
        x = [i + 1 for i, _ in mine]
        mk = markers[k % len(markers)]
        a.plot(x, [s.get("r2_heldout_run", nan) for _, s in mine], marker=mk, color=COLORS["heldout"], label=f"{model}: held-out")
        a.plot(x, [s.get("r2_fresh_init", nan) for _, s in mine], marker=mk, ls="--", color=COLORS["fresh"], label=f"{model}: fresh")
        b.plot(x, [s.get(f"one_step_best_prompt_{shown_metric(s)}_mean", nan) for _, s in mine], marker=mk, color=COLORS["gpt"],
               label=f"{model}: G.pt one update")
        b.plot(x, [s.get(f"sgd_1_epoch_{shown_metric(s)}_mean", nan) for _, s in mine], marker=mk, ls=":", color=COLORS["recipe"],
               label=f"{model}: recipe, 1 epoch")
    a.axhline(0, color="grey", lw=0.8)
    lowest = np.nanmin([s.get(k, 0.0) for s in ordered for k in ("r2_heldout_run", "r2_fresh_init")] + [0.0])
    a.set_ylim(bottom=max(-3.0, lowest - 0.1), top=1.05)  # below -3 a model is simply not aligned: keep the scale readable
    a.set_xlabel("evaluation (oldest = 1)")
    a.set_ylabel("prompt alignment R² (1 = exact)")
    a.set_title("Prompt alignment over evaluations")
    metrics = sorted({shown_metric(s) for s in ordered}) or ["test_loss"]
    b.set_xlabel("evaluation (oldest = 1)")
    b.set_ylabel(", ".join(metric_label(m) for m in metrics) + " (fresh inits, mean)")
    b.set_title("One update from random inits")
    for ax in (a, b):
        ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
        ax.legend(fontsize=7)
    return png(fig)


INDEX_HEAD = ["| eval | created | model | step | metric | R² held-out | R² fresh | start | G.pt 1 step | recipe 1 epoch | "
              "G.pt 1 step / recipe 25 epochs |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]


def index_rows(summaries: list[dict], link: str) -> list[str]:
    """One table row per evaluation; ``link``: where its report is, with ``{eval}`` for its name."""
    nan, rows = float("nan"), []
    for s in summaries:
        shown = shown_metric(s)
        rows.append(f"| [{s['eval']}]({link.format(eval=s['eval'])}) | {s.get('created_at', '')[:16]} | {s['model']} | "
                    f"{s.get('model_step')} | {shown} | {s.get('r2_heldout_run', nan):.3f} | {s.get('r2_fresh_init', nan):.3f} | "
                    f"{s.get(f'start_{shown}_mean', nan):.3f} | {s.get(f'one_step_best_prompt_{shown}_mean', nan):.3f} | "
                    f"{s.get(f'sgd_1_epoch_{shown}_mean', nan):.3f} | {ratio_to_recipe(s, shown)} |")
    return rows


def index_markdown(summaries: list[dict], report: str = "report.md") -> str:
    """``evals/index.md`` (links to each ``report.md``) or the index page's text (``report.html``): every
    evaluation, newest first, with its headline numbers, under the trend plot."""
    return "\n".join(["# Evaluations", "", "![trend over evaluations](trend.png)", "",
                      "Each row in its model's own metric: the start networks' mean, then after one G.pt update "
                      "prompted with the sweep's best value, then after one epoch of the sweep's recipe; last, G.pt's "
                      "one update over the recipe's 25 epochs from the same fresh inits (± its standard error).", "",
                      *INDEX_HEAD, *index_rows(summaries, "{eval}/" + report)]) + "\n"


def index_files(summaries: list[dict]) -> dict[str, bytes]:
    """``evals/index.md``, ``evals/trend.png`` and the self-contained ``evals/index.html``."""
    trend = trend_plot(summaries)
    return {"index.md": index_markdown(summaries).encode(), "trend.png": trend,
            "index.html": html_page("Evaluations", index_markdown(summaries, "report.html"), {"trend.png": trend})}


def model_card(model: str, lineage: dict, loss_png: bytes, summaries: list[dict]) -> bytes:
    """``models/<model>/card.html``: where the model came from, how it trained, how it did."""
    config = lineage.get("train_config", {})
    lines = [f"# G.pt `{model}`", "",
             f"Problem `{lineage.get('problem')}`, conditioned on `{lineage.get('metric')}`; trained {lineage.get('step')} steps "
             f"({lineage.get('train_wall_s')} s on {lineage.get('device', 'an unrecorded device')}, model-FLOPs utilisation "
             f"{lineage.get('mfu', float('nan')):.1%}) on {lineage.get('training_runs')} runs of sweeps {', '.join(lineage.get('sweeps', []))} "
             f"(catalog digest `{str(lineage.get('catalog_digest', ''))[:12]}`); code {lineage.get('code_version')}; "
             f"created {str(lineage.get('created_at', ''))[:16]}, updated {str(lineage.get('updated_at', ''))[:16]}.", "",
             "![training loss](train_loss.png)", "", "## Training settings", "", "| setting | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in config.items()]
    if candidates := lineage.get("candidates"):  # gptpipe.stages.candidates
        how = (f"prompt alignment of validation inits over a range of prompts (`{lineage.get('validation_metric')}`)"
               if lineage.get("chosen_by") == "alignment" else
               f"one update from validation inits, scored by `{lineage.get('validation_metric')}` on the training split")
        lines += ["", "## Chosen from candidates", "", f"The best of {len(candidates)} trainings by {how}:", "",
                  "| candidate | validation score | |", "|---|---|---|"]
        lines += [f"| `{name}` | {score:.4f} | {'kept' if name == lineage.get('chosen') else ''} |" for name, score in candidates.items()]
    lines += ["", "## Evaluations", ""]
    if summaries:
        lines += [*INDEX_HEAD, *index_rows(summaries, "../../evals/{eval}/report.html")]
    else:
        lines.append("None yet: `gptpipe evaluate --model " + model + "`.")
    return html_page(f"G.pt {model}", "\n".join(lines) + "\n", {"train_loss.png": loss_png})


def sweep_plot(runs: dict, metric: str, higher_is_better: bool, title: str) -> bytes:
    """A sweep at a glance: each run's best ``metric`` against its learning rate (diverged runs marked),
    and how the final values are spread."""
    plt = plt_module()
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    lr = np.asarray(runs["lr"], dtype=float)
    best = np.asarray(runs[f"best_{metric}"], dtype=float)
    final = np.asarray(runs[f"final_{metric}"], dtype=float)
    diverged = np.asarray(runs["status"]) == "diverged"
    ok = ~diverged
    a.scatter(lr[ok], best[ok], s=6, alpha=0.5, color=COLORS["recipe"], label=f"{ok.sum()} runs")
    if diverged.any():
        a.scatter(lr[diverged], np.where(np.isfinite(best[diverged]), best[diverged], np.nanmax(best)), s=14, marker="x",
                  color=COLORS["bad"], label=f"{diverged.sum()} diverged")
    a.set_xscale("log")
    a.set_xlabel("learning rate (log scale)")
    a.set_ylabel(f"best {metric_label(metric)}")
    a.set_title(f"Best {metric} per run ({'higher' if higher_is_better else 'lower'} is better)")
    a.legend(fontsize=8)
    b.hist(final[np.isfinite(final)], bins=30, color=COLORS["recipe"], alpha=0.8)
    b.set_xlabel(f"final {metric_label(metric)}")
    b.set_ylabel("runs")
    b.set_title("Final checkpoints")
    fig.suptitle(title, fontsize=10)
    return png(fig)
