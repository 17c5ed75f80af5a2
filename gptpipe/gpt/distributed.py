"""Multi-process (DDP) helpers: one process per GPU, started by ``torchrun``.

``torchrun --nproc_per_node N`` sets RANK, LOCAL_RANK and WORLD_SIZE for each process; ``init_from_env``
joins the process group (NCCL on CUDA, gloo on CPU). The ``Trainer`` notices an initialised process
group by itself: it wraps the model in ``DistributedDataParallel`` (gradients are averaged across
ranks every step), gives every rank its own pair-sampling seed, splits the batch across ranks, and
callers write to the store from rank 0 only (``is_main()``). See docs/multi-gpu.md.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def backend_for(device: str) -> str:
    """NCCL for GPU training, gloo for CPU training, whatever the node has: the requested device
    ("cpu", "cuda", or "auto" = CUDA when present) decides, not the hardware alone."""
    if device == "auto":
        device = os.environ.get("GPTPIPE_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
    return "nccl" if device.startswith("cuda") else "gloo"


def init_from_env(device: str = "auto") -> bool:
    """Join the process group described by torchrun's environment, with the backend for ``device``;
    False (and nothing done) when the process was not started by torchrun (WORLD_SIZE unset or 1)."""
    if dist.is_available() and dist.is_initialized():
        return True
    if env_world_size() <= 1:
        return False
    backend = backend_for(device)
    if backend == "nccl":
        torch.cuda.set_device(local_rank())
    dist.init_process_group(backend)
    return True


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if active():
        dist.barrier()


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
