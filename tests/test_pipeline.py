"""collect -> train -> evaluate through the flows, on a real Prefect server, checked from the store."""

import json
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

from gptpipe import data, problems
from storage import catalog, params
from storage.store import open_store
from tests.conftest import invoke

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def small_store(tmp_path_factory, prefect_server):
    """A tiny digits sweep and a G.pt trained on it for a few steps (shared by the tests below)."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.collect import collect_flow
    from flows.train import train_flow

    url = str(tmp_path_factory.mktemp("pipeline") / "store")
    with temporary_settings(updates={PREFECT_API_URL: prefect_server["api_url"]}):
        collect_flow(store=url, sweep="tiny", problem="digits_mlp", runs=40, shard_size=20, epochs=3, checkpoints=6)
        summary = train_flow(store=url, sweeps=["tiny"], model="g", steps=4, save_every=2, batch_size=16)
    assert summary["step"] == 4
    return url


def test_train_writes_model_and_resumes(small_store, prefect_api):
    from flows.train import train_flow

    store = open_store(small_store)
    lineage = store.read_json("models", "g", "lineage.json")
    assert lineage["step"] == 4 and lineage["sweeps"] == ["tiny"] and len(lineage["heldout_runs"]["tiny"]) == 4
    assert lineage["device"].startswith("cpu (")  # what "auto" became, recorded
    assert 0 < lineage["mfu"] < 1
    assert store.fs.cat_file(store.path("models", "g", "train_loss.png"))[:4] == b"\x89PNG"
    log = store.fs.cat_file(store.path("models", "g", "train_log.csv")).decode().splitlines()
    assert log[0] == "step,loss" and len(log) == 5
    summary = train_flow(store=small_store, sweeps=["tiny"], model="g", steps=6, save_every=2, batch_size=16)
    assert summary["step"] == 6
    log = store.fs.cat_file(store.path("models", "g", "train_log.csv")).decode().splitlines()
    assert len(log) == 7 and log[1:5] == ["1," + log[1].split(",")[1]] + log[2:5]  # first steps kept, not redone


def test_evaluate_rows_params_and_report(small_store, prefect_api):
    from flows.evaluate import evaluate_flow

    summary = evaluate_flow(store=small_store, model="g", eval="e1", networks=4, prompts=3, recursive=2, calibration_networks=8,
                            optimiser_steps=100)
    store = open_store(small_store)
    rows = catalog.query(store, "select * from evaluations where eval = 'e1' order by network, step, requested").to_pylist()
    grid = [r for r in rows if r["step"] == 1 and r["sample"] == 0]
    assert len(grid) == 4 * 3 and {r["source"] for r in grid} == {"heldout_run", "fresh_init"}
    assert len([r for r in rows if r["step"] == 2]) == 2  # recursive updates of the fresh inits
    # row i of params.zarr holds the parameters that achieved row i
    results = catalog.query(store, "select achieved, test_error from evaluations where eval = 'e1'").to_pylist()
    vectors = params.open_params(store, "evals", "e1", "params.zarr")[:]
    assert vectors.shape == (len(results), 760)
    problem, dataset = problems.get("digits_mlp"), data.load("digits")
    scores = problem.score(torch.from_numpy(np.asarray(vectors)), dataset)
    np.testing.assert_allclose(scores["test_loss"].numpy(), [r["achieved"] for r in results], rtol=1e-5)
    np.testing.assert_allclose(scores["test_error"].numpy(), [r["test_error"] for r in results], atol=1e-9)
    # the report's R² is recomputable from the table
    from gptpipe.evaluation.sampling import prompt_alignment_r2

    held = [r for r in grid if r["source"] == "heldout_run"]
    req = np.array([r["requested"] for r in held]).reshape(-1, 3)
    ach = np.array([r["achieved"] for r in held]).reshape(-1, 3)
    assert summary["r2_heldout_run"] == pytest.approx(prompt_alignment_r2(req, ach))
    per_network = 1 - ((req - ach) ** 2).sum(1) / ((req - req.mean(1, keepdims=True)) ** 2).sum(1)
    assert summary["r2_median_heldout_run"] == pytest.approx(np.median(per_network))  # by hand: unbounded below
    report = store.fs.cat_file(store.path("evals", "e1", "report.md")).decode()
    assert f"| prompt alignment R² (mean over networks) | {summary['r2_heldout_run']:.3f} |" in report
    assert f"| median network's R² | {summary['r2_median_heldout_run']:.3f} |" in report
    # not copies: the samples' distance to the training checkpoints against held-out runs' own, at the end
    # of their runs and where SGD got them to the samples' level
    assert summary["nn_distance_heldout_at_level_median"] > 0
    assert f"(reference at the same level) | {summary['nn_distance_heldout_at_level_median']:.4g} |" in report
    for png in ("alignment.png", "curves.png", "one_step_test_loss.png", "latent_walk.png"):
        assert store.fs.cat_file(store.path("evals", "e1", png))[:4] == b"\x89PNG"
    assert "![latent walk](latent_walk.png)" in report and summary["latent_walk_frames"] == 8
    assert summary["latent_walk_s"] < 5
    index = store.fs.cat_file(store.path("evals", "index.md")).decode()
    assert "e1" in index and f"| {summary['one_step_over_recipe_test_error']:.3g}× ± " in index  # in test error, as the index shows classifiers
    # baselines are in the catalog too, and the report's SGD numbers come from them
    base = catalog.query(store, "select optimiser, epochs, steps, avg(test_loss) as m from baselines "
                                "where eval = 'e1' and source = 'fresh_init' group by all").to_pylist()
    recipe_25 = [r["m"] for r in base if r["optimiser"] == "sweep_recipe" and r["epochs"] == 25]
    assert recipe_25 and recipe_25[0] == pytest.approx(summary["sgd_25_epochs_test_loss_mean"])
    # G.pt's one step over the recipe's 25 epochs, paired over the same fresh inits: the report and the
    # command line give it with its standard error
    ratio, se = summary["one_step_over_recipe_test_loss"], summary["one_step_over_recipe_test_loss_se"]
    assert ratio == pytest.approx(summary["one_step_best_prompt_test_loss_mean"] / recipe_25[0]) and se > 0
    assert f"| {ratio:.3g}× ± {se:.2g} |" in report
    sgd = sorted((r["steps"], r["m"]) for r in base if r["optimiser"] == "sgd")
    assert [m for _, m in sgd] == pytest.approx(summary["sgd_curve_test_loss_mean"])
    assert [s for s, _ in sgd] == summary["optimiser_steps"] == [0, 1, 2, 4, 8, 16, 32, 64]  # up to the 100 asked for
    diversity = catalog.query(store, "select network, count(*) as n from evaluations where eval = 'e1' and step = 1 "
                                     "and requested = (select min(requested) from evaluations where eval = 'e1') group by network "
                                     "having count(*) > 1").to_pylist()
    assert diversity and all(r["n"] == 8 for r in diversity)
    # G.pt was prompted through the model's calibration, fitted on this first evaluation and saved with the
    # model; `prompted` is what it was given for each request, recomputable from the saved calibration
    from gptpipe.evaluation import calibration

    saved = store.read_json("models", "g", "calibration.json")
    assert saved["step"] == store.read_json("models", "g", "lineage.json")["step"] and 0 < saved["networks"] <= 8 and summary["calibration"] == saved
    net_rows = [[r for r in grid if r["network"] == n] for n in sorted({r["network"] for r in grid})]
    start = np.array([rows[0]["start"] for rows in net_rows])
    requested = np.array([[r["requested"] for r in rows] for rows in net_rows])
    prompted = np.array([[r["prompted"] for r in rows] for rows in net_rows])
    np.testing.assert_allclose(prompted, calibration.condition(saved, start, requested, 1), rtol=1e-5)
    assert not np.allclose(prompted, requested)
    assert "![calibration](calibration.png)" in report


def test_evaluate_without_calibration_prompts_the_requests(small_store, prefect_api):
    out = invoke("evaluate", "--store", small_store, "--model", "g", "--eval", "raw", "--networks", "2", "--prompts", "3",
              "--no-calibration", "--optimiser-steps", "8")
    assert out.returncode == 0, out.stderr
    rows = catalog.query(open_store(small_store), "select requested, prompted from evaluations where eval = 'raw'").to_pylist()
    assert rows and all(r["prompted"] == r["requested"] for r in rows)
    assert "calibration.png" not in open_store(small_store).ls("evals", "raw")
    ratio = open_store(small_store).read_json("evals", "raw", "summary.json")["one_step_over_recipe_test_loss"]
    assert f"one step = {ratio:.3g}× the recipe's 25 epochs" in out.stdout  # one fresh init: no standard error


def test_evaluate_with_another_sampler_fits_its_own_calibration(small_store, prefect_api):
    # the bias G.pt's prompts are corrected for depends on the sampler: the model's own calibration (the
    # one `gptpipe prompt` reads) is neither used nor replaced by an evaluation that samples differently
    store = open_store(small_store)
    saved_path = store.path("models", "g", "calibration.json")
    before = store.fs.cat_file(saved_path) if store.fs.exists(saved_path) else None
    out = invoke("evaluate", "--store", small_store, "--model", "g", "--eval", "ddpm", "--networks", "2", "--prompts", "3",
              "--calibration-networks", "8", "--sampler", "ddpm", "--sample-steps", "3", "--optimiser-steps", "8")
    assert out.returncode == 0, out.stderr
    assert store.read_json("evals", "ddpm", "summary.json")["calibration"]["sampler"] == "ddpm:3"
    assert (store.fs.cat_file(saved_path) if store.fs.exists(saved_path) else None) == before


def test_model_is_evaluated_with_its_guidance_and_temperature(small_store, prefect_api):
    # a model trained with prompt dropout is sampled with its own guidance scale and temperature by default,
    # with a calibration named for them (how far G.pt over- or under-delivers depends on both)
    out = invoke("train", "--store", small_store, "--sweep", "tiny", "--model", "cfg", "--steps", "4", "--batch-size", "16",
              "--prompt-dropout", "0.2", "--guidance", "2", "--temperature", "0.5")
    assert out.returncode == 0, out.stderr
    store = open_store(small_store)
    train_config = store.read_json("models", "cfg", "lineage.json")["train_config"]
    assert train_config["guidance"] == 2.0 and train_config["temperature"] == 0.5
    out = invoke("evaluate", "--store", small_store, "--model", "cfg", "--eval", "w2", "--networks", "2", "--prompts", "3", "--calibration-networks", "8",
              "--recursive", "1", "--optimiser-steps", "8")
    assert out.returncode == 0, out.stderr
    summary = store.read_json("evals", "w2", "summary.json")
    assert summary["guidance"] == 2.0 and summary["temperature"] == 0.5 and summary["calibration"]["sampler"] == "ddim:10:w2:T0.5"
    report_md = store.fs.cat_file(store.path("evals", "w2", "report.md")).decode()
    assert "classifier-free guidance 2" in report_md and "temperature 0.5" in report_md
    assert store.read_json("models", "cfg", "calibration.json")["sampler"] == "ddim:10:w2:T0.5"  # the model's own, kept
    # another temperature for one evaluation: a calibration of its own, the model's left as it is
    out = invoke("evaluate", "--store", small_store, "--model", "cfg", "--eval", "t1", "--networks", "2", "--prompts", "3", "--calibration-networks", "8",
              "--recursive", "1", "--optimiser-steps", "8", "--temperature", "1")
    assert out.returncode == 0, out.stderr
    assert store.read_json("evals", "t1", "summary.json")["calibration"]["sampler"] == "ddim:10:w2"
    out = invoke("evaluate", "--store", small_store, "--model", "cfg", "--sampler", "mean")
    assert out.returncode == 2 and "add --temperature 1" in out.stderr and out.stderr.strip().count("\n") == 0
    assert store.read_json("models", "cfg", "calibration.json")["sampler"] == "ddim:10:w2:T0.5"


def latest_artifact(api_url: str, key: str) -> dict:
    request = urllib.request.Request(f"{api_url}/artifacts/filter", headers={"content-type": "application/json"},
                                     data=json.dumps({"artifacts": {"key": {"any_": [key]}}, "sort": "CREATED_DESC", "limit": 1}).encode())
    with urllib.request.urlopen(request) as r:
        return json.load(r)[0]


def test_train_seed_gives_another_training(small_store, prefect_api):
    # --seed: another draw of G.pt's init, pairs and noise and of the held-out runs (how much one training
    # differs from the next is measured this way), recorded in the lineage
    out = invoke("train", "--store", small_store, "--sweep", "tiny", "--model", "seed1", "--steps", "2", "--batch-size", "16",
              "--seed", "1")
    assert out.returncode == 0, out.stderr
    store = open_store(small_store)
    seeded, default = (store.read_json("models", m, "lineage.json") for m in ("seed1", "g"))
    assert seeded["train_config"]["seed"] == 1 and default["train_config"]["seed"] == 0
    assert seeded["heldout_runs"]["tiny"] != default["heldout_runs"]["tiny"]
    first_loss = [store.fs.cat_file(store.path("models", m, "train_log.csv")).decode().splitlines()[1] for m in ("seed1", "g")]
    assert first_loss[0] != first_loss[1]


def test_train_candidates_keeps_the_best_by_validation_and_resumes(small_store, prefect_api):
    from gptpipe.stages.candidates import validation_score

    command = ("train", "--store", small_store, "--sweep", "tiny", "--model", "best2", "--steps", "4", "--batch-size", "16",
               "--candidates", "2")
    out = invoke(*command)
    assert out.returncode == 0, out.stderr
    store = open_store(small_store)
    lineage = store.read_json("models", "best2", "lineage.json")
    scores = lineage["candidates"]
    assert set(scores) == {"best2-candidate0", "best2-candidate1"} and lineage["validation_metric"] == "train_loss"
    assert lineage["chosen_by"] == "one-update"
    candidates = {name: store.read_json("models", name, "lineage.json") for name in scores}
    assert {c["train_config"]["seed"] for c in candidates.values()} == {0, 1}  # two draws of G.pt's own randomness...
    assert len({json.dumps(c["heldout_runs"]) for c in candidates.values()}) == 1  # ...on the same training runs
    for name, score in scores.items():  # each score is the candidate's validation as stored, recomputed
        assert score == pytest.approx(validation_score(store, name), rel=1e-5)
    assert scores[lineage["chosen"]] == min(scores.values())  # lower training loss is better
    state = lambda name: store.fs.cat_file(store.path("models", name, "state.safetensors"))
    assert state("best2") == state(lineage["chosen"])
    card = store.fs.cat_file(store.path("models", "best2", "card.html")).decode()
    assert "Chosen from candidates" in card and all(f"{score:.4f}" in card for score in scores.values())
    assert invoke(*command).returncode == 0  # re-run: trained candidates are only checked, the choice kept
    assert store.read_json("models", "best2", "lineage.json")["updated_at"] == lineage["updated_at"]
    refused = invoke("train", "--store", small_store, "--sweep", "tiny", "--model", "g", "--steps", "4", "--batch-size", "16",
                  "--candidates", "2")  # an existing model was not chosen from candidates: not overwritten
    assert refused.returncode != 0 and "not chosen from 2 candidates" in refused.stderr
    assert state("g") != state("best2")


def test_train_candidates_by_alignment_keeps_the_best_aligned(small_store, prefect_api):
    """--choose-by alignment (CartPole's target): each candidate's prompt alignment R² over validation inits,
    through its own calibration, which the kept model carries over."""
    from gptpipe.stages.candidates import validation_score
    from storage import models

    command = ("train", "--store", small_store, "--sweep", "tiny", "--model", "aligned2", "--steps", "4", "--batch-size", "16",
               "--candidates", "2", "--calibration-networks", "8", "--choose-by", "alignment", "--validation-inits", "16")
    out = invoke(*command)
    assert out.returncode == 0, out.stderr
    store = open_store(small_store)
    lineage = store.read_json("models", "aligned2", "lineage.json")
    scores = lineage["candidates"]
    assert lineage["chosen_by"] == "alignment" and lineage["validation_metric"] == "test_loss alignment R²"
    assert lineage["validation_inits"] == 16
    calibrations = {name: models.read_calibration(store, name) for name in scores}
    # fitted for the validation, as an evaluation fits it, on the fresh inits asked for (those with room to improve)
    assert all(c is not None and 2 <= c["networks"] <= 8 for c in calibrations.values())
    for name, score in scores.items():
        assert score == pytest.approx(validation_score(store, name, "alignment", 16), abs=1e-9)
    assert scores[lineage["chosen"]] == max(scores.values())  # higher R² is better
    assert models.read_calibration(store, "aligned2") == calibrations[lineage["chosen"]]
    card = store.fs.cat_file(store.path("models", "aligned2", "card.html")).decode()
    assert "prompt alignment of validation inits" in card
    refused = invoke(*command[:-3], "one-update")  # chosen by alignment: not re-chosen another way under the same name
    assert refused.returncode != 0 and "by one-update" in refused.stderr


def test_train_candidates_on_torchvision_data_needs_its_root_before_training(tmp_path, prefect_api):
    from tests.test_data import write_idx

    write_idx(tmp_path / "data", "MNIST", n_train=200, n_test=50)
    store = str(tmp_path / "store")
    out = invoke("collect", "--store", store, "--sweep", "m", "--problem", "mnist_mlp", "--data", "mnist", "--data-root",
              str(tmp_path / "data"), "--runs", "4", "--shard-size", "4", "--epochs", "1", "--checkpoints", "2", "--workers", "1")
    assert out.returncode == 0, out.stderr
    train = ("train", "--store", store, "--sweep", "m", "--model", "c", "--steps", "2", "--batch-size", "16", "--candidates", "2")
    refused = invoke(*train)  # the candidates are scored on the sweep's data: without it, nothing is trained
    assert refused.returncode != 0 and "needs --data-root" in refused.stderr and len(refused.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "store" / "models").exists()
    out = invoke(*train, "--data-root", str(tmp_path / "data"))
    assert out.returncode == 0, out.stderr
    assert set(open_store(store).read_json("models", "c", "lineage.json")["candidates"]) == {"c-candidate0", "c-candidate1"}


def test_reports_show_every_picture_in_a_browser(small_store, prefect_server, prefect_api):
    """What a user opens: the artifacts in the Prefect UI, report.html and the index as files, the model card."""
    from flows.evaluate import evaluate_flow
    from tests.browser import loaded_images, page

    evaluate_flow(store=small_store, model="g", eval="seen", networks=4, prompts=3, recursive=2)
    store = open_store(small_store)
    report = store.fs.cat_file(store.path("evals", "seen", "report.md")).decode()
    pictures = report.count("![")
    assert pictures == len([f for f in store.ls("evals", "seen") if f.endswith(".png")]) >= 9  # every plot is shown
    root = Path(store.path())
    opened = {}
    with page() as pg:
        for key, at_least in (("eval-report", pictures), ("eval-index", 1), ("model-g", 1), ("sweep-tiny", 1)):
            pg.goto(f"{prefect_server['ui_url']}/artifacts/artifact/{latest_artifact(prefect_server['api_url'], key)['id']}")
            opened[key] = loaded_images(pg, at_least)
        for name, path, at_least in (("report.html", root / "evals" / "seen" / "report.html", pictures),
                                     ("index.html", root / "evals" / "index.html", 1),
                                     ("card.html", root / "models" / "g" / "card.html", 1)):
            pg.goto(path.as_uri())
            opened[name] = loaded_images(pg, at_least)
            assert "seen" in pg.content()  # the evaluation is listed (the card lists its model's evaluations)
        errors = pg.errors
    for name, images in opened.items():
        assert images and all(i["width"] > 0 for i in images), (name, [i for i in images if i["width"] == 0])
        if name != "eval-report" and not name.endswith("html"):
            assert any(i["src"].startswith("data:image/png") for i in images), name
    assert errors == []
    assert len(latest_artifact(prefect_server["api_url"], "eval-report")["data"]) < 1_500_000  # quick to load


def test_cli_bad_inputs(small_store, tmp_path):
    for args, message in [
        (["train", "--store", small_store, "--sweep", "nope", "--model", "m"], "no sweep 'nope'"),
        (["train", "--store", small_store, "--sweep", "tiny", "--model", "m", "--preset", "huge"], "unknown preset"),
        (["evaluate", "--store", small_store, "--model", "nope"], "no model 'nope'"),
        (["evaluate", "--store", str(tmp_path), "--model", "g"], "no model 'g'"),
        (["train", "--store", str(tmp_path / "missing"), "--sweep", "tiny", "--model", "m"], "does not exist"),
        (["train", "--store", small_store, "--sweep", "tiny", "--model", "m", "--save-every", "0"], "--save-every must be positive"),
        (["train", "--store", small_store, "--sweep", "tiny", "--model", "m", "--choose-by", "luck"], "unknown --choose-by 'luck'"),
        (["train", "--store", small_store, "--sweep", "tiny", "--model", "m", "--validation-inits", "1"], "--validation-inits must be at least 2"),
        (["train", "--store", small_store, "--sweep", "tiny", "--model", "m", "--calibration-networks", "1"], "--calibration-networks must be at least 2"),
        (["train", "--store", small_store, "--sweep", "tiny", "--model", "m", "--memory-budget", "nan"], "--memory-budget must be"),
        (["train", "--store", small_store, "--sweep", "/etc", "--model", "m"], "leaves the store"),
        (["train", "--store", small_store, "--sweep", "tiny", "--model", "m", "--guidance", "2"], "--guidance needs a model trained with --prompt-dropout"),
        (["train", "--store", small_store, "--sweep", "tiny", "--model", "m", "--prompt-dropout", "1"], "--prompt-dropout must be in [0, 1)"),
        (["evaluate", "--store", small_store, "--model", "g", "--guidance", "2"], "g was trained without"),
        (["evaluate", "--store", small_store, "--model", "g", "--guidance", "0"], "--guidance must be"),
        (["train", "--store", small_store, "--sweep", "tiny", "--model", "m", "--temperature", "0"], "--temperature must be"),
        (["evaluate", "--store", small_store, "--model", "g", "--sampler", "mean", "--temperature", "0.5"], "not of 'mean'"),
        (["evaluate", "--store", small_store, "--model", "g", "--calibration-networks", "1"], "--calibration-networks must be at least 2"),
        (["evaluate", "--store", small_store, "--model", "g", "--optimiser-steps", "0"], "--optimiser-steps must be at least 1"),
        (["collect", "--store", small_store, "--sweep", "x", "--problem", "digits_mlp", "--runs", "2", "--lr-max", "inf"], "lr_max < inf"),
        (["collect", "--store", small_store, "--sweep", "x", "--problem", "digits_mlp", "--runs", str(10**12)], "split it into sweeps"),
        (["collect", "--store", small_store, "--sweep", "x", "--problem", "digits_mlp", "--runs", "2", "--workers", "-1"], "--workers must be"),
    ]:
        proc = invoke(*args)
        assert proc.returncode == 2 and message in proc.stderr and proc.stderr.strip().count("\n") == 0, (args, proc)
    assert not open_store(small_store).exists("models", "m") and not open_store(small_store).exists("sweeps", "x")


def test_flows_refuse_names_that_leave_the_store(small_store, prefect_api, tmp_path):
    """Deployed flows get their parameters from anyone who can start a run: names are checked where used."""
    from flows.evaluate import evaluate_flow
    from flows.train import train_flow
    from storage.store import StoreError

    outside = tmp_path / "outside"
    for call in (lambda: train_flow(store=small_store, sweeps=["tiny"], model=str(outside), steps=2),
                 lambda: train_flow(store=small_store, sweeps=["../tiny"], model="m2", steps=2),
                 lambda: evaluate_flow(store=small_store, model="g", eval=str(outside)),
                 lambda: evaluate_flow(store=small_store, model="../g")):
        with pytest.raises(StoreError, match="leaves the store|invalid .* name"):
            call()
    assert not outside.exists() and not open_store(small_store).exists("models", "m2")


def test_catalog_sees_evaluations_json(small_store, prefect_api):
    proc = invoke("catalog", "--store", small_store, "--format", "json",
               "select source, count(*) as n from evaluations where step = 1 group by source order by source", check=True)
    counts = {r["source"]: r["n"] for r in json.loads(proc.stdout)}
    assert set(counts) >= {"heldout_run", "fresh_init"}
