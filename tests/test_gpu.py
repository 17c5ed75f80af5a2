"""On a CUDA device (marker ``gpu``: skipped, and reported as skipped, on a machine without one). The
rest of the suite pins G.pt to the CPU; these put the same code on the GPU, as ``train --device cuda``
and ``evaluate --device cuda`` do."""

from __future__ import annotations

import sys

import pytest
import torch

from gptpipe import evaluation, problems
from gptpipe.gpt.trainer import Trainer, TrainConfig
from tests.conftest import REPO

pytestmark = pytest.mark.gpu

DIGITS = problems.get("digits_mlp")
MICRO = dict(depth=2, width=64, heads=2)


def _sweep():
    g = torch.Generator().manual_seed(0)
    theta0 = DIGITS.init([torch.Generator().manual_seed(s) for s in range(12)])
    params = theta0.unsqueeze(1) * (1 - 0.1 * torch.arange(6)).view(1, 6, 1) + 0.01 * torch.randn(12, 6, DIGITS.n_params, generator=g)
    return params, 2.3 - 0.3 * torch.arange(6).float().repeat(12, 1)


def test_training_on_the_gpu_draws_noise_there_prefetches_and_samples_like_the_cpu():
    params, metric = _sweep()
    cfg = TrainConfig(model=MICRO, steps=60, batch_size=64, warmup=5, seed=0, device="cuda")
    tr = Trainer(DIGITS, params, metric, cfg)
    assert tr.device.type == "cuda" and tr.prefetch and tr.noise_generator.device.type == "cuda"
    b = tr.batch()
    assert all(v.device.type == "cuda" for v in b.values())
    losses = tr.train()
    assert sum(losses[-10:]) < sum(losses[:10])
    resumed = Trainer.from_bytes(DIGITS, params, metric, tr.state_dict_bytes())
    torch.testing.assert_close(torch.tensor(resumed.step_many(3)), torch.tensor(tr.step_many(3)))
    # the same model on the CPU samples (nearly) what it samples on the GPU
    from gptpipe.gpt.trainer import load_model

    blob = tr.state_dict_bytes()
    start, m0, m1 = params[:4, 0], metric[:4, 0], metric[:4, -1]
    on = {}
    for device in ("cuda", "cpu"):
        model, diffusion, _ = load_model(blob, device=device)
        on[device] = evaluation.sample(model, diffusion, start.to(device), m0.to(device), m1.to(device), "ddim", 10,
                                       torch.Generator().manual_seed(5)).cpu()
    torch.testing.assert_close(on["cuda"], on["cpu"], atol=1e-3, rtol=1e-3)


def test_the_prepared_gpu_check_runs_whole_on_the_gpu(tmp_path):
    sys.path.insert(0, str(REPO / "bench"))
    from gpu_check import main

    result = main(["--device", "cuda", "--out", str(tmp_path / "check.json")])
    c = result["correctness"]
    assert c["loss_last"] < c["loss_first"] and c["resume_equal"]
    assert {r["precision"] for r in result["training"]} >= {"fp32", "bf16"}
