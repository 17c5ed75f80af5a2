"""Where work runs: what "auto" picks with and without a visible GPU, the DDP backend, and the one-line
refusals for a device that is not here. Each case runs in a fresh process, as CUDA is read once."""

import os
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import REPO, run_cli

PROBE = ("import torch; from gptpipe.gpt.trainer import resolve_device; from gptpipe.gpt.distributed import backend_for; "
         "print(resolve_device('auto').type, backend_for('auto'), backend_for('cpu'), backend_for('cuda'), int(torch.cuda.is_available()))")


def probe(**env_changes) -> list[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("GPTPIPE_DEVICE", "CUDA_VISIBLE_DEVICES")}
    env.update({k: v for k, v in env_changes.items() if v is not None})
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, cwd=REPO, capture_output=True, text=True, check=True)
    return out.stdout.split()


@pytest.mark.parametrize("visible", [None, ""], ids=["CUDA_VISIBLE_DEVICES unset", "CUDA_VISIBLE_DEVICES empty"])
def test_auto_follows_the_visible_gpu_and_the_backend_follows_the_device(visible):
    device, auto_backend, cpu_backend, cuda_backend, has_cuda = probe(CUDA_VISIBLE_DEVICES=visible)
    assert device == ("cuda" if has_cuda == "1" else "cpu")
    if visible == "":
        assert device == "cpu"
    assert auto_backend == ("nccl" if device == "cuda" else "gloo")
    assert (cpu_backend, cuda_backend) == ("gloo", "nccl")  # --device cpu under torchrun on a GPU node: gloo


def test_gptpipe_device_pins_auto():
    device, auto_backend, *_ = probe(GPTPIPE_DEVICE="cpu")
    assert (device, auto_backend) == ("cpu", "gloo")


def test_a_device_that_is_not_here_is_one_line(tmp_path):
    no_gpu = {"CUDA_VISIBLE_DEVICES": "", "GPTPIPE_DEVICE": ""}
    store = str(tmp_path / "store")
    for args, message in [
        (["train", "--store", store, "--sweep", "s", "--model", "m", "--preset", "paper"], "sized for a GPU"),
        (["train", "--store", store, "--sweep", "s", "--model", "m", "--device", "cuda"], "torch sees no CUDA device"),
        (["evaluate", "--store", store, "--model", "m", "--device", "cuda"], "torch sees no CUDA device"),
    ]:
        proc = run_cli(*args, env=no_gpu)
        assert proc.returncode == 2 and message in proc.stderr and proc.stderr.count("\n") == 1, (args, proc.stderr)
    assert not (tmp_path / "store").exists()


def test_the_prepared_gpu_check_runs_reduced_on_the_cpu(tmp_path):
    """bench/gpu_check.py is what runs on a GPU machine when one is lent: CPU-sized here so it cannot rot."""
    sys.path.insert(0, str(REPO / "bench"))
    from gpu_check import main

    out = tmp_path / "check.json"
    result = main(["--reduced", "--device", "cpu", "--out", str(out), "--mnist-runs", "8", "--train-s", "2"])
    assert result == __import__("json").loads(out.read_text())
    c = result["correctness"]
    assert c["loss_last"] < c["loss_first"] and c["resume_equal"] and c["samples_max_abs_diff_vs_cpu"] == 0.0
    fp32 = next(r for r in result["training"] if r["precision"] == "fp32")
    assert fp32["steps_per_s"] > 0 and 0 < fp32["mfu"] and fp32["model_tflops"] > 0
    fed = {(r["fed_from"], r["gathered_ahead"]) for r in result["training"]}
    assert {("memory", True), ("stream", True), ("memory", False)} <= fed and all(r["steps_per_s"] > 0 for r in result["training"])
    assert result["sampling"]["ddim10_samples_per_s_cpu"] > 0
    # (d): a real mnist_mlp sweep, a G.pt trained on it, evaluated on held-out and fresh starts
    sweep, small = result["mnist_sweep"], result["mnist_small"]
    assert sweep["runs"] == 8 and sweep["checkpoints"] == 20 and 0 < sweep["best_test_loss"] < 2.3
    assert small["steps"] > 10 and all(np.isfinite(small[k]) for k in ("r2_heldout", "r2_fresh", "one_step_test_error"))
    assert 0 < small["recipe_25_epochs_test_error"] < 0.5 and small["one_step_vs_recipe"] > 0


def test_flows_take_their_share_of_the_workers_cores(monkeypatch):
    import torch

    from flows.runners import set_torch_threads

    before = torch.get_num_threads()
    try:
        monkeypatch.delenv("GPTPIPE_TORCH_THREADS", raising=False)
        assert set_torch_threads(None) == before  # nothing said: torch's own choice ($OMP_NUM_THREADS) stays
        monkeypatch.setenv("GPTPIPE_TORCH_THREADS", "2")
        assert set_torch_threads(None) == 2 == torch.get_num_threads()
        assert set_torch_threads(1) == 1  # a run's own parameter wins
    finally:
        torch.set_num_threads(before)
