"""Training G.pt on checkpoint data held in memory (no I/O here: the caller reads the store).

Data: ``params [R, C, P]`` (R runs, C checkpoints each, flat parameters in state_dict order) and
``metric [R, C]`` (the metric G.pt is prompted with, e.g. test_loss). A training example is a pair of
checkpoints of one run, start i < target j: the model learns to produce theta_j from (theta_i, L_i, L_j).
Both checkpoints of a pair get the same random hidden-unit permutation (the network's function is
unchanged, so this is free data). Optimisation: AdamW, linear warm-up then cosine decay, gradient
clipping, an exponential moving average (EMA) of the weights for sampling.

Pairs come from ``params`` held in memory (small sweeps) or from a ``StreamingPairs`` source that
reads groups of whole runs from the store in a background thread (big sweeps; see ``gptpipe.pairs``).

Several processes (``torchrun``, see ``gptpipe.distributed`` and docs/multi-gpu.md): when a process
group is initialised, the model is wrapped in DistributedDataParallel, ``batch_size`` is the global
batch (split evenly across ranks), every rank draws its own pairs (seed + rank), gradients are averaged
across ranks, and all ranks keep identical weights, EMA included; only rank 0 should save.

Saving: ``Trainer.state_dict_bytes()`` is one safetensors blob (raw weights, EMA weights, AdamW moments,
random-generator state, both configs as JSON metadata); ``Trainer.from_bytes`` resumes from it and
``load_model`` turns it into a sampler-ready model.
"""

from __future__ import annotations

import json
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, fields
from typing import Callable

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from safetensors.torch import save_file as st_save_file

from gptpipe.gpt import distributed
from gptpipe import problems as problems_mod
from gptpipe.gpt.diffusion import Diffusion
from gptpipe.gpt.model import UNIT_TOKENS, Gpt, GptConfig, Normalizer, fit_unit_basis, unit_index
from gptpipe.gpt.pairs import SYMMETRIES, StreamingPairs, gather_pairs, resolve_symmetry, sample_pair_indices, valid_counts

FORMAT = "gptpipe.gpt/1"
PAIRINGS = ("uniform", "init", "mixed", "two-way", "stay")
# Training settings that come with a model preset (``TrainConfig.for_preset``); the dataclass defaults are
# the CPU demo's. "paper": the paper's MNIST configuration (configs/train/*.yaml of its code release).
PRESET_TRAINING: dict[str, dict] = {
    "paper": dict(lr=4e-4, batch_size=1024, ema=0.9999, weight_decay=0.1, grad_clip=0.75, beta2=0.999),
}


@dataclass
class TrainConfig:
    """How G.pt is trained (JSON-able). ``model`` overrides fields of the preset's ``GptConfig``."""

    preset: str = "tiny"
    model: dict = field(default_factory=dict)
    steps: int = 1000  # length of the learning-rate schedule (more overfits a 512-run sweep, see docs/gpt-ablations.md)
    batch_size: int = 128
    lr: float = 3e-3
    min_lr_frac: float = 0.1  # cosine decays to lr * min_lr_frac
    warmup: int = 200
    weight_decay: float = 0.05
    beta2: float = 0.99
    grad_clip: float = 1.0
    ema: float = 0.999
    seed: int = 0
    device: str = "auto"  # "auto" = CUDA when present, else CPU
    autocast: str = "auto"  # "auto" (bf16 on CUDA; on CPU bf16 from width 256 up), "bf16", "none"
    compile: bool = False  # torch.compile the training step's model (a minute or more of compiling first; bench/gpt.py compile)
    normalization: str = "layer"  # per-layer scales, or "global" (one scale)
    pairing: str = "mixed"  # "uniform" i<j (the paper), "init" (i = 0), "mixed" (a fraction init_frac from i = 0), "two-way" (mixed, a quarter reversed), "stay" (mixed, a tenth j = i)
    init_frac: float = 0.5
    symmetry: str = "auto"  # hidden-unit order of training pairs: "permute", "canonical", "none" (pairs.resolve_symmetry)
    unit_tokens: bool | None = None  # one shared-type token per hidden unit (problems with ``unit_axes``); None = the preset's choice
    # coordinates of a unit's incoming weights in a basis fitted on the training updates (gpt.UnitBasis);
    # None = width / 2 where a unit token would be longer than the model is wide (mnist_mlp), else 0 (raw weights)
    unit_basis: int | None = None
    t_high_frac: float = 0.5  # fraction of training timesteps drawn from the top tenth of the schedule
    # fraction of training pairs shown without their target metric, which classifier-free guidance needs
    prompt_dropout: float = 0.0
    sampler: str = "ddim"  # defaults for evaluation
    sample_steps: int = 10
    guidance: float = 1.0  # classifier-free guidance scale (> 1 needs prompt_dropout > 0)
    temperature: float = 1.0  # scale of the sampler's starting noise (evaluation.sampling.sample)

    def __post_init__(self):
        if self.pairing not in PAIRINGS:
            raise ValueError(f"pairing must be one of {', '.join(PAIRINGS)}, not {self.pairing!r}")
        if self.symmetry not in SYMMETRIES:
            raise ValueError(f"symmetry must be one of {', '.join(SYMMETRIES)}, not {self.symmetry!r}")
        if self.autocast not in ("auto", "bf16", "none"):
            raise ValueError(f"autocast must be auto, bf16 or none, not {self.autocast!r}")
        if not 0 < self.temperature <= 2:
            raise ValueError(f"temperature must be in (0, 2], got {self.temperature}")
        if self.guidance != 1.0 and not self.prompt_dropout > 0:
            raise ValueError(f"guidance {self.guidance} needs a model trained with prompt_dropout > 0")

    @classmethod
    def for_preset(cls, **given) -> "TrainConfig":
        """The preset's training settings (``PRESET_TRAINING``) under what the caller ``given``."""
        return cls(**{**PRESET_TRAINING.get(given.get("preset", cls.preset), {}), **given})

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        if "permute" in d and "symmetry" not in d:  # models saved before symmetry replaced the permute flag
            d = {**d, "symmetry": "permute" if d["permute"] else "none"}
        return cls(**{k: v for k, v in d.items() if k in known})


class DeviceError(ValueError):
    """A device that is not here."""


def resolve_device(name: str) -> torch.device:
    """"auto" = ``$GPTPIPE_DEVICE`` when set (the tests pin it to cpu), else CUDA when present, else CPU;
    "cuda" under torchrun is this process's LOCAL_RANK GPU."""
    if name == "auto":
        name = os.environ.get("GPTPIPE_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise DeviceError(f"device {name!r} asked for, but torch sees no CUDA device (torch {torch.__version__}, "
                         f"CUDA build {torch.version.cuda or 'none'}, CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r})")
    if name == "cuda" and distributed.active():
        return torch.device("cuda", distributed.local_rank())
    return torch.device(name)


def describe_device(device: torch.device) -> str:
    """What a run ran on, for logs, lineages and reports: "cuda:0 (NVIDIA H200)", "cpu (2 threads)"."""
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"cpu ({torch.get_num_threads()} threads)"


def use_bf16(config: TrainConfig, gpt_config: GptConfig, device: torch.device) -> bool:
    """bf16 autocast pays on CUDA and, on CPUs with AMX, only once the model is compute-bound (measured
    here at width 128, 2 threads: depth 4 fp32 78 vs bf16 84 ms/step, depth 6 120 vs 104, depth 8
    171 vs 134; width 256 at depth 4 is faster in bf16 too)."""
    if config.autocast != "auto":
        return config.autocast == "bf16"
    return device.type == "cuda" or (cpu_has_bf16() and gpt_config.width * gpt_config.depth >= 768)


def matmul_peak_flops(device: torch.device, dtype: torch.dtype = torch.float32, n: int = 1024, repeats: int = 10) -> float:
    """FLOP/s of an n x n matmul in ``dtype`` on ``device``: the ceiling model-FLOPs utilisation is read against."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t = time.perf_counter()
    for _ in range(repeats):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return 2 * n**3 * repeats / (time.perf_counter() - t)


def cpu_has_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AMX or AVX512-BF16). Without it bf16 is emulated:
    on a 2-core AMD EPYC with AVX2 only, a `tiny` mnist_mlp step took 22.3 s in bf16 against 1.5 s in fp32."""
    probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


_valid_counts = valid_counts  # (old name)


class Trainer:
    """Trains one G.pt. ``problem``: a problem object (or its name); ``params [R, C, P]``, ``metric [R, C]``
    (numpy or torch); ``state``: what ``state_dict_bytes`` saved, unpacked (use ``Trainer.from_bytes``).

    ``stream``: a ``StreamingPairs`` source instead of ``params``/``metric`` (pass ``None`` for both);
    the normalisation is then fitted on a fixed sample of its runs (``StreamingPairs.fit_sample``)."""

    def __init__(self, problem, params, metric, config: TrainConfig | None = None, state: dict | None = None,
                 stream: StreamingPairs | None = None):
        self.problem = problems_mod.get(problem) if isinstance(problem, str) else problem
        self.config = config = config or TrainConfig()
        self.rank, self.world = distributed.rank(), distributed.world_size()
        if config.batch_size % self.world:
            raise ValueError(f"batch size {config.batch_size} does not split evenly across {self.world} processes")
        self.local_batch = config.batch_size // self.world
        self.stream = stream
        if stream is not None:
            if stream.batch_size != self.local_batch:
                raise ValueError(f"the pair stream yields batches of {stream.batch_size}, this process needs {self.local_batch}")
            params, metric = stream.fit_sample(seed=config.seed)  # identical on every rank
        params = torch.as_tensor(np.asarray(params), dtype=torch.float32)
        metric = torch.as_tensor(np.asarray(metric), dtype=torch.float32)
        if params.ndim != 3 or metric.shape != params.shape[:2]:
            raise ValueError(f"need params [R, C, P] and metric [R, C], got {tuple(params.shape)} and {tuple(metric.shape)}")
        if params.shape[2] != self.problem.n_params:
            raise ValueError(f"params have {params.shape[2]} values per checkpoint, {self.problem.name} has {self.problem.n_params}")
        n_valid = _valid_counts(params, metric)
        keep = n_valid >= 2
        if not bool(keep.any()):
            raise ValueError("no run has two usable checkpoints")
        if not bool(keep.all()):  # (a masked copy only when some run is unusable: the demo's 5.2 GB of checkpoints stay one copy)
            params, metric, n_valid = params[keep], metric[keep], n_valid[keep]
        self.params, self.metric, self.n_valid = params, metric, n_valid
        self.symmetry = resolve_symmetry(self.problem, config.symmetry)  # "auto" decided once, for pairs and model
        self.device = resolve_device(config.device)
        # every rank its own pairs (drawn on the host, where the checkpoints are) and its own noise and
        # timesteps (drawn on the training device: a 1024 x 7,960 batch of noise is never copied over)
        self.generator = torch.Generator().manual_seed(config.seed + 1_000_003 * self.rank)
        self.noise_generator = torch.Generator(device=self.device).manual_seed(config.seed + 2 + 1_000_003 * self.rank)
        # on a GPU the next batch's pairs are gathered on the host while the device runs this step
        self.prefetch = self.device.type == "cuda"

        if state is None:
            torch.manual_seed(config.seed)
            layers = [[layer.name, list(layer.shape)] for layer in self.problem.layers]
            fit_pairs = self.sample_pairs(4096, torch.Generator().manual_seed(config.seed + 1))
            param_scale, delta_scale, fit_updates = Normalizer.fit(self.params, [layer.numel for layer in self.problem.layers],
                                                                   config.normalization, pairs=fit_pairs)
            self.gpt_config = GptConfig.from_preset(config.preset, layers, param_scale=param_scale,
                                                    delta_scale=delta_scale, **self._model_settings())
            self.gpt_config.unit_basis = self._unit_basis_size()
        else:
            self.gpt_config = GptConfig.from_dict(state["gpt_config"])
        self.model = Gpt(self.gpt_config).to(self.device)
        if state is None and self.gpt_config.unit_basis:
            shapes = [shape for _, shape in self.gpt_config.layers]
            self.model.unit_basis.basis.copy_(fit_unit_basis(fit_updates, shapes, self.gpt_config.units, self.gpt_config.unit_basis))
        self.ema = Gpt(self.gpt_config).to(self.device)
        self.ema.load_state_dict(self.model.state_dict())
        self.ema.requires_grad_(False)
        self.train_model = self.model  # what the loss is computed with: the model, or its DDP wrapper
        if distributed.active():
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.train_model = DistributedDataParallel(self.model, device_ids=ids)  # broadcasts rank 0's weights
        if config.compile:  # the same weights: compiling wraps the module, saving and the EMA use self.model
            self.train_model = torch.compile(self.train_model)
        self.diffusion = Diffusion(self.gpt_config.timesteps)
        self.normalizer = Normalizer(self.gpt_config, self.device)
        decay = [p for n, p in self.model.named_parameters() if p.dim() >= 2 and n != "pos_emb"]
        no_decay = [p for n, p in self.model.named_parameters() if not (p.dim() >= 2 and n != "pos_emb")]
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=config.lr, betas=(0.9, config.beta2), foreach=True,
        )
        self.bf16 = use_bf16(config, self.gpt_config, self.device)
        self.step = 0
        self.losses: list[float] = []
        self.wall_s = 0.0
        if state is not None:
            self._load_state(state)

    def _unit_basis_size(self) -> int:
        c, g = self.config, self.gpt_config
        if c.unit_basis is not None:
            return c.unit_basis if g.units else 0
        if not g.units or g.target != "delta":
            return 0
        unit_len = unit_index([shape for _, shape in g.layers], g.units).shape[1]  # values one unit token carries
        return g.width // 2 if unit_len > g.width else 0

    # --- schedule -----------------------------------------------------------------------------
    def lr_at(self, step: int) -> float:
        c = self.config
        if step < c.warmup:
            return c.lr * (step + 1) / c.warmup
        progress = min(1.0, (step - c.warmup) / max(1, c.steps - c.warmup))
        return c.lr * (c.min_lr_frac + (1 - c.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * progress)))

    # --- data ---------------------------------------------------------------------------------
    def sample_pairs(self, n: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(run, i, j)`` index tensors ``[n]``, both < n_valid[run] (runs held in memory; ``sample_pair_indices``)."""
        return sample_pair_indices(self.n_valid, n, generator or self.generator, self.config.pairing, self.config.init_frac)

    def batch(self, n: int | None = None, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """A training batch of ``n`` pairs (default: this process's share of ``batch_size``), with its
        diffusion timesteps and noise, on the training device. From the stream when there is one;
        ``generator`` (a host one) draws pairs, timesteps and noise instead of the trainer's own."""
        return self.to_device(self.host_pairs(n, generator), generator)

    def _model_settings(self) -> dict:
        """The new model's settings beyond its preset's: the config's ``model`` overrides, unit tokens,
        the canonical unit order and prompt dropout."""
        config, model = self.config, dict(self.config.model)
        units = UNIT_TOKENS.get(config.preset, False) if config.unit_tokens is None else config.unit_tokens
        if units and self.problem.unit_axes and "units" not in model:
            model["units"] = [list(u) for u in self.problem.unit_axes]
        if self.symmetry == "canonical":
            model["canonical"] = self.problem.name  # the sampler puts starts in this problem's canonical order
        if config.prompt_dropout > 0:
            model["prompt_dropout"] = config.prompt_dropout
        return model

    def host_pairs(self, n: int | None = None, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """The pairs of a batch, gathered on the host (``step_many`` runs this a step ahead on a GPU)."""
        c = self.config
        n = n or self.local_batch
        if self.stream is not None and generator is None and n == self.stream.batch_size:
            pairs = self.stream.next()
        else:
            pairs = gather_pairs(self.problem, self.params, self.metric, self.n_valid, n, generator or self.generator,
                                 c.pairing, c.init_frac, self.symmetry)
        return {k: pairs[k] for k in ("theta_i", "theta_j", "metric_i", "metric_j")}

    def to_device(self, pairs: dict[str, torch.Tensor], generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """``pairs`` on the training device, with timesteps and noise drawn there."""
        if self.device.type == "cuda":  # page-locked host memory: the copies run alongside the previous step's kernels
            pairs = {k: v.pin_memory().to(self.device, non_blocking=True) for k, v in pairs.items()}
        g = generator or self.noise_generator
        n = len(pairs["theta_i"])
        t = self.diffusion.sample_t(n, g, self.config.t_high_frac)
        noise = torch.randn(n, self.problem.n_params, generator=g, device=g.device)
        return {**pairs, "t": t.to(self.device), "noise": noise.to(self.device)}

    def loss_on(self, model: Gpt, b: dict[str, torch.Tensor], drop_prompts: bool = False) -> torch.Tensor:
        """The batch's diffusion loss; ``drop_prompts`` (training steps) hides the target metric of a
        ``prompt_dropout`` fraction of the pairs."""
        start = self.normalizer.normalize(b["theta_i"])
        x0 = self.normalizer.x0(self.normalizer.normalize(b["theta_j"]), start)
        target = b["metric_j"]
        if drop_prompts and self.gpt_config.prompt_dropout > 0:
            hidden = torch.rand(target.shape, generator=self.noise_generator, device=target.device) < self.gpt_config.prompt_dropout
            target = target.masked_fill(hidden, float("nan"))
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            denoise = lambda x_t, t: model(x_t, start, t, b["metric_i"], target)
            return self.diffusion.loss(denoise, x0, b["t"], b["noise"]).mean()

    # --- optimisation -------------------------------------------------------------------------
    def optimize(self, batch: dict[str, torch.Tensor]) -> float:
        """One optimiser step on ``batch`` (this process's share); returns the batch loss (under DDP the
        mean over all ranks' batches, i.e. the loss of the global batch)."""
        return self._step(batch).item()

    def _step(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """``optimize`` with the loss left on the device: reading it waits for the GPU, so ``step_many``
        reads a whole chunk's losses at once."""
        self.train_model.train()
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(self.step)
        loss = self.loss_on(self.train_model, batch, drop_prompts=True)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()  # under DDP: gradients averaged across ranks here
        if self.config.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
        self.optimizer.step()
        self._update_ema()
        self.step += 1
        loss = loss.detach()
        if self.world > 1:
            loss = loss.clone()
            torch.distributed.all_reduce(loss)
            loss /= self.world
        return loss

    def step_many(self, n: int) -> list[float]:
        """``n`` optimiser steps; returns their losses."""
        t0 = time.perf_counter()
        if self.prefetch and n > 1:
            with ThreadPoolExecutor(max_workers=1, thread_name_prefix="gpt-batch") as ahead:
                pending = ahead.submit(self.host_pairs)
                losses = []
                for k in range(n):
                    pairs = pending.result()
                    if k + 1 < n:
                        pending = ahead.submit(self.host_pairs)
                    losses.append(self._step(self.to_device(pairs)))
        else:
            losses = [self._step(self.batch()) for _ in range(n)]
        out = torch.stack(losses).float().tolist() if losses else []  # one wait for the device per chunk
        self.wall_s += time.perf_counter() - t0
        self.losses.extend(out)
        return out

    def close(self):
        """Stop the pair stream's background thread (if any)."""
        if self.stream is not None:
            self.stream.close()

    @torch.no_grad()
    def _update_ema(self):
        decay = min(self.config.ema, (1 + self.step) / (10 + self.step))
        ema_p, p = list(self.ema.parameters()), list(self.model.parameters())
        torch._foreach_lerp_(ema_p, p, 1.0 - decay)

    def train(self, steps: int | None = None, on_progress: Callable[[int, float], None] | None = None, every: int = 100) -> list[float]:
        """Train until ``steps`` (default: the schedule's ``config.steps``) steps are done in total,
        calling ``on_progress(step, mean loss of the last chunk)`` every ``every`` steps."""
        target = self.config.steps if steps is None else steps
        out = []
        while self.step < target:
            chunk = self.step_many(min(every, target - self.step))
            out.extend(chunk)
            if on_progress is not None:
                on_progress(self.step, float(np.mean(chunk)))
        return out

    @torch.no_grad()
    def validation_loss(self, params, metric, n: int = 1024, seed: int = 1) -> float:
        """The EMA model's diffusion loss on pairs from other runs (same pair sampling, fixed seed)."""
        other = Trainer.__new__(Trainer)
        other.__dict__.update(self.__dict__)
        other.params = torch.as_tensor(np.asarray(params), dtype=torch.float32)
        other.metric = torch.as_tensor(np.asarray(metric), dtype=torch.float32)
        other.n_valid = _valid_counts(other.params, other.metric)
        other.stream = None
        self.ema.eval()  # pairs, timesteps and noise all from one fixed-seed generator: the trainer's streams untouched
        return float(other.loss_on(self.ema, other.batch(n, generator=torch.Generator().manual_seed(seed))))

    # --- saving -------------------------------------------------------------------------------
    def state_dict_bytes(self) -> bytes:
        """Everything needed to resume (or sample), as safetensors bytes."""
        tensors, meta = self._state_tensors()
        return st_save(tensors, metadata=meta)

    def save_state(self, path: str) -> None:
        """``state_dict_bytes`` written straight to the file ``path``: one host copy of the state, not two
        (a paper-size state is ~6 GB)."""
        tensors, meta = self._state_tensors()
        st_save_file(tensors, path, metadata=meta)

    def _state_tensors(self) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()}
        tensors.update({f"ema.{k}": v.detach().cpu().contiguous() for k, v in self.ema.state_dict().items()})
        for k, state in self.optimizer.state_dict()["state"].items():
            for name, v in state.items():
                tensors[f"opt.{k}.{name}"] = torch.as_tensor(v).detach().cpu().contiguous()
        tensors["rng"] = self.generator.get_state()
        tensors["rng_noise"] = self.noise_generator.get_state()
        meta = {
            "noise_device": self.device.type,
            "format": FORMAT,
            "gpt_config": json.dumps(self.gpt_config.to_dict()),
            "train_config": json.dumps(self.config.to_dict()),
            "step": str(self.step),
            "wall_s": repr(self.wall_s),
            "losses": json.dumps(self.losses),
        }
        return tensors, meta

    @classmethod
    def from_bytes(cls, problem, params, metric, blob: bytes | str, config: TrainConfig | None = None,
                   stream: StreamingPairs | None = None) -> "Trainer":
        """Resume training from ``state_dict_bytes()`` (or the path of a ``save_state`` file). ``config`` may change e.g. ``steps`` or ``device``;
        by default the saved one is used. (From a stream, resuming continues with fresh groups: exact
        replay is guaranteed for in-memory data only.)"""
        state = unpack(blob)
        return cls(problem, params, metric, config or TrainConfig.from_dict(state["train_config"]), state=state, stream=stream)

    def _load_state(self, state: dict):
        t = state["tensors"]
        self.model.load_state_dict({k[6:]: v for k, v in t.items() if k.startswith("model.")})
        self.ema.load_state_dict({k[4:]: v for k, v in t.items() if k.startswith("ema.")})
        opt = self.optimizer.state_dict()
        opt_state: dict[int, dict] = {}
        for k, v in t.items():
            if k.startswith("opt."):
                _, idx, name = k.split(".", 2)
                opt_state.setdefault(int(idx), {})[name] = v
        opt["state"] = opt_state
        self.optimizer.load_state_dict(opt)
        self.generator.set_state(t["rng"])  # rank 0's stream
        if "rng_noise" in t and state.get("noise_device") == self.device.type:
            self.noise_generator.set_state(t["rng_noise"])
        else:  # saved on another kind of device (or before noise was drawn on the device): a stream of its own
            self.noise_generator.manual_seed(self.config.seed + 3 + 7_919 * int(state["step"]))
        if self.rank > 0:  # other ranks: their own streams again, and new ones after every resume
            self.generator.manual_seed(self.config.seed + 1_000_003 * self.rank + 7_919 * int(state["step"]))
            self.noise_generator.manual_seed(self.config.seed + 2 + 1_000_003 * self.rank + 7_919 * int(state["step"]))
        self.step = state["step"]
        self.losses = list(state["losses"])
        self.wall_s = state["wall_s"]

    def sampler_model(self, use_ema: bool = True) -> tuple[Gpt, Diffusion, GptConfig]:
        model = self.ema if use_ema else self.model
        model.eval()
        return model, self.diffusion, self.gpt_config


def unpack(blob: bytes | str) -> dict:
    """The contents of a ``state_dict_bytes`` blob, or of a saved file at path ``blob``: tensors,
    configs (dicts), step, losses. A file is memory-mapped and read tensor by tensor, so processes on
    one machine share its pages instead of each holding its own copy of the bytes."""
    if isinstance(blob, (str, os.PathLike)):
        with safe_open(blob, framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
            meta = f.metadata() or {}
    else:
        tensors = st_load(blob)
        meta = _metadata(blob)
    if meta.get("format") != FORMAT:
        raise ValueError(f"not a G.pt checkpoint (format {meta.get('format')!r})")
    return {
        "tensors": tensors,
        "gpt_config": json.loads(meta["gpt_config"]),
        "train_config": json.loads(meta["train_config"]),
        "step": int(meta["step"]),
        "wall_s": float(meta.get("wall_s", "0")),
        "losses": json.loads(meta.get("losses", "[]")),
        "noise_device": meta.get("noise_device"),
    }


def _metadata(blob: bytes) -> dict:
    """The safetensors header's ``__metadata__`` (an 8-byte little-endian length, then JSON)."""
    n = int.from_bytes(blob[:8], "little")
    return json.loads(blob[8 : 8 + n].decode("utf-8")).get("__metadata__", {})


def load_model(blob: bytes, use_ema: bool = True, device: str = "cpu") -> tuple[Gpt, Diffusion, GptConfig]:
    """A sampler-ready model from ``state_dict_bytes()`` (EMA weights by default), in eval mode."""
    state = unpack(blob)
    config = GptConfig.from_dict(state["gpt_config"])
    model = Gpt(config)
    prefix = "ema." if use_ema else "model."
    model.load_state_dict({k[len(prefix):]: v for k, v in state["tensors"].items() if k.startswith(prefix)})
    model.to(resolve_device(device)).eval()
    return model, Diffusion(config.timesteps), config
