"""The multi-process (DDP) training path, on the CPU: 2 processes, gloo backend.

What torchrun does on a GPU node (one process per GPU, NCCL) runs here as 2 CPU processes started by
torch.multiprocessing with the same environment variables torchrun sets."""

import os
import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from gptpipe import problems
from gptpipe.gpt import distributed
from gptpipe.gpt.trainer import TrainConfig, Trainer

DIGITS = problems.get("digits_mlp")
MICRO = dict(width=32, depth=1, heads=2, num_frequencies=8, conditioning="adaln", fuse_inputs=True, target="delta")
WORLD, GLOBAL_BATCH, STEPS = 2, 32, 3


def toy_data():
    R, C = 12, 6
    theta0 = DIGITS.init([torch.Generator().manual_seed(s) for s in range(R)])
    params = theta0.unsqueeze(1) * (1 - 0.1 * torch.arange(C)).view(1, C, 1)
    metric = 2.3 - 0.3 * torch.arange(C).float().repeat(R, 1)
    return params, metric


def config(steps=40):
    return TrainConfig(model=MICRO, unit_tokens=True, steps=steps, batch_size=GLOBAL_BATCH, lr=3e-3, warmup=5, seed=0)


def fixed_batches(trainer):
    """The same global batches on every process (their own generator, not the rank's)."""
    return [trainer.batch(GLOBAL_BATCH, generator=torch.Generator().manual_seed(100 + k)) for k in range(STEPS)]


def flat(module):
    return torch.cat([p.detach().reshape(-1) for p in module.parameters()])


def worker(rank, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(WORLD))
    torch.set_num_threads(1)
    assert distributed.init_from_env()
    try:
        params, metric = toy_data()
        # 1. fixed global batches, each rank taking its half: must equal one process on the whole batch
        tr = Trainer(DIGITS, params, metric, config())
        assert tr.world == WORLD and tr.local_batch == GLOBAL_BATCH // WORLD
        half = slice(rank * tr.local_batch, (rank + 1) * tr.local_batch)
        fixed_losses = [tr.optimize({k: v[half] for k, v in b.items()}) for b in fixed_batches(tr)]
        fixed = flat(tr.model)
        # 2. ordinary training: each rank draws its own pairs; weights stay in sync, loss falls
        tr2 = Trainer(DIGITS, params, metric, config())
        first = tr2.batch()["theta_i"]
        losses = tr2.train()
        torch.save({"fixed": fixed, "fixed_losses": fixed_losses, "weights": flat(tr2.model), "ema": flat(tr2.ema),
                    "first_batch": first, "losses": losses}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        distributed.shutdown()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_match_one_process_and_stay_in_sync(tmp_path):
    mp.spawn(worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD))
    # identical weights (and EMA) on both ranks after each phase
    assert torch.equal(r0["fixed"], r1["fixed"])
    assert torch.equal(r0["weights"], r1["weights"]) and torch.equal(r0["ema"], r1["ema"])
    assert r0["losses"] == r1["losses"]  # the logged loss is the global batch's, the same on every rank
    # each rank its own pairs
    assert not torch.equal(r0["first_batch"], r1["first_batch"])
    # the loss falls
    assert np.mean(r0["losses"][-10:]) < 0.7 * np.mean(r0["losses"][:10])
    # one process on the combined batches reaches the same weights
    torch.set_num_threads(1)
    params, metric = toy_data()
    single = Trainer(DIGITS, params, metric, config())
    assert single.world == 1
    single_losses = [single.optimize(b) for b in fixed_batches(single)]
    np.testing.assert_allclose(r0["fixed_losses"], single_losses, rtol=1e-5)
    torch.testing.assert_close(r0["fixed"], flat(single.model), rtol=1e-4, atol=1e-6)


def resume_worker(rank, port, url, out_dir):
    """Each process resumes model ``m`` from an S3 store, counting downloads of its state."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(WORLD))
    torch.set_num_threads(1)
    from gptpipe.stages import train as train_stage
    from storage import models
    from storage.store import open_store

    download = models.download_state

    def counted(store, model, path):
        with open(os.path.join(out_dir, "downloads"), "a") as f:
            f.write(f"{rank}\n")
        download(store, model, path)

    models.download_state = counted
    assert distributed.init_from_env()
    try:
        params, metric = toy_data()
        with train_stage.saved_state(open_store(url), "m") as path:
            tr = Trainer.from_bytes(DIGITS, params, metric, path)
        torch.save({"path": path, "weights": flat(tr.model), "ema": flat(tr.ema), "step": tr.step},
                   os.path.join(out_dir, f"resumed{rank}.pt"))
    finally:
        distributed.shutdown()


@pytest.mark.slow
def test_processes_of_one_node_resume_from_one_download(s3_store_url, tmp_path):
    """Resuming from an object store, the node's first process downloads the state once and every
    process reads that copy (a paper-size state is ~6 GB: one per process would be ~12 GB of host
    memory each); the copy is gone afterwards. From a local store the stored file is read in place."""
    from storage import models
    from storage.store import open_store

    params, metric = toy_data()
    trainer = Trainer(DIGITS, params, metric, config())
    trainer.step_many(3)
    saved = tmp_path / "state.safetensors"
    trainer.save_state(str(saved))
    for url in (s3_store_url, str(tmp_path / "local")):
        models.save(open_store(url, create=True), "m", str(saved), {"step": 3}, trainer.losses, b"png")
    out = tmp_path / "out"
    out.mkdir()
    mp.spawn(resume_worker, args=(free_port(), s3_store_url, str(out)), nprocs=WORLD, join=True)
    assert (out / "downloads").read_text().split() == ["0"]
    r0, r1 = (torch.load(out / f"resumed{r}.pt") for r in range(WORLD))
    assert r0["path"] == r1["path"] and not os.path.exists(r0["path"])
    for r in (r0, r1):
        assert r["step"] == 3 and torch.equal(r["weights"], flat(trainer.model)) and torch.equal(r["ema"], flat(trainer.ema))

    from gptpipe.stages.train import saved_state

    local = open_store(str(tmp_path / "local"))
    with saved_state(local, "m") as path:
        assert path == local.path("models", "m", "state.safetensors")
        assert Trainer.from_bytes(DIGITS, params, metric, path).step == 3
    assert os.path.exists(path)  # the store's own file, read in place, stays
