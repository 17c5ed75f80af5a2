"""G.pt: a transformer that denoises neural-network parameters, conditioned on where training starts.

Inputs (one row per example, parameters already normalised, see ``Normalizer``):

- ``x_t [B, P]``   the noisy diffusion variable (the target parameters, or the update, see ``target``)
- ``start [B, P]`` the starting parameters theta_i
- ``t [B]``        the diffusion timestep (0 .. timesteps-1)
- ``start_metric [B]`` and ``target_metric [B]``: the metric theta_i achieves and the one we ask for

Output: the model's estimate of the clean diffusion variable ("x0 prediction").

The flat parameter vector is cut into tokens along the problem's layers (``chunk_layout``); every
chunk has its own linear encoder and decoder, because chunk k always holds the same kind of numbers
(e.g. "the first-layer weights"). Scalars enter as frequency embeddings, either as extra tokens (the
paper) or through adaptive layer norm (as in DiT). Everything else is a plain pre-LN transformer with
no causal mask. Presets: ``tiny`` (runs on two CPU cores in minutes), ``small``, ``paper`` (the published
width 1536, 12 layers, 16 heads).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields

import numpy as np
import torch
from torch import nn

# ------------------------------------------------------------------------------------------------
# configuration
# ------------------------------------------------------------------------------------------------

PRESETS: dict[str, dict] = {
    # The CPU demo. Its settings are the winners of bench/gpt_ablations.py (docs/gpt-ablations.md).
    # max_chunk = width: a chunk never holds more values than its decoder can express (Tokenizer).
    "tiny": dict(width=128, depth=8, heads=4, max_chunk=128, num_frequencies=32, max_freq_log2=6.0,
                 conditioning="adaln", fuse_inputs=True, target="delta"),
    "small": dict(width=384, depth=6, heads=6, max_chunk=384, num_frequencies=64, max_freq_log2=8.0,
                  conditioning="adaln", fuse_inputs=True, target="delta"),
    # As published for MNIST/CIFAR (configs/train/*.yaml of the paper's code release).
    "paper": dict(width=1536, depth=12, heads=16, max_chunk=1000, num_frequencies=128, max_freq_log2=14.0,
                  conditioning="tokens", fuse_inputs=False, target="params"),
}
# Whether a preset gives each hidden unit its own (shared-type) token when the problem describes its
# units (``problem.unit_axes``); the paper cuts layers into chunks only.
UNIT_TOKENS = {"tiny": True, "small": True, "paper": False}


@dataclass
class GptConfig:
    """Everything needed to rebuild a G.pt model (JSON-able: lists, numbers, strings)."""

    layers: list  # [[name, [shape...]], ...] in flat state_dict order (a problem's ``layers``)
    width: int = 128
    depth: int = 4
    heads: int = 4
    mlp_ratio: int = 4
    max_chunk: int = 1000  # a layer with more values is split into several tokens
    num_frequencies: int = 32  # scalar embedding: sin/cos at this many frequencies ...
    max_freq_log2: float = 6.0  # ... spaced log-uniformly from 2^0 to 2^max_freq_log2
    conditioning: str = "tokens"  # "tokens" (the paper: scalars are extra tokens) or "adaln" (DiT)
    fuse_inputs: bool = False  # True: one token holds both x_t's and start's chunk (half the tokens)
    target: str = "params"  # diffusion variable: "params" (theta_j, the paper) or "delta" (theta_j - theta_i, rescaled)
    units: list = field(default_factory=list)  # [[layer, axis], ...]: one shared-type token per hidden unit (see Tokenizer)
    unit_basis: int = 0  # > 0: a unit's incoming weights enter and leave its token as this many coordinates (UnitBasis)
    canonical: str = ""  # a problem name: starts are put in its canonical unit order before sampling (symmetry "canonical")
    # > 0: this fraction of training pairs is shown without its target metric (a learned "no prompt"
    # embedding), so that sampling can steer with classifier-free guidance (``Gpt.guided``)
    prompt_dropout: float = 0.0
    timesteps: int = 1000
    preset: str = ""
    # parameter normalisation, fitted on the training data (``Normalizer.fit``): one number per layer
    param_scale: list = field(default_factory=list)  # normalised = raw * scale
    delta_scale: list = field(default_factory=list)  # "delta" target: x0 = (theta_j - theta_i) / delta_scale (normalised units)

    def __post_init__(self):
        self.layers = [[str(name), [int(s) for s in shape]] for name, shape in self.layers]
        self.units = [[int(li), int(axis)] for li, axis in self.units]
        if self.conditioning not in ("tokens", "adaln"):
            raise ValueError(f"conditioning must be 'tokens' or 'adaln', not {self.conditioning!r}")
        if self.target not in ("params", "delta"):
            raise ValueError(f"target must be 'params' or 'delta', not {self.target!r}")
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not divisible by heads {self.heads}")
        if not 0.0 <= self.prompt_dropout < 1.0:
            raise ValueError(f"prompt_dropout must be in [0, 1), not {self.prompt_dropout}")

    @classmethod
    def from_preset(cls, name: str, layers, **overrides) -> "GptConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r} (choose from {', '.join(PRESETS)})")
        return cls(layers=[[layer[0], list(layer[1])] for layer in _layer_pairs(layers)], preset=name,
                   **{**PRESETS[name], **overrides})

    @property
    def layer_sizes(self) -> list[int]:
        return [math.prod(shape) for _, shape in self.layers]

    @property
    def n_params(self) -> int:
        return sum(self.layer_sizes)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "GptConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def _layer_pairs(layers):
    """Accept a problem's ``Layer`` objects or ``[name, shape]`` pairs."""
    return [(layer.name, tuple(layer.shape)) if hasattr(layer, "name") else (layer[0], tuple(layer[1])) for layer in layers]


# ------------------------------------------------------------------------------------------------
# tokens <-> flat parameter vectors
# ------------------------------------------------------------------------------------------------


def chunk_layout(layer_sizes: list[int], max_chunk: int) -> list[tuple[int, int, int]]:
    """Cut the flat vector into chunks that never cross a layer boundary and hold at most ``max_chunk``
    values: ``[(start, size, layer index), ...]`` in flat order (the paper's "chunk within layer")."""
    out, start = [], 0
    for li, n in enumerate(layer_sizes):
        for offset in range(0, n, max_chunk):
            out.append((start + offset, min(max_chunk, n - offset), li))
        start += n
    return out


def unit_index(layer_shapes: list[list[int]], units: list) -> torch.Tensor:
    """Flat indices of each hidden unit's parameters, ``[H, U]``. ``units = [[layer, axis], ...]``
    says along which axis of which layers the hidden units run (for Linear-ReLU-Linear:
    ``[[0, 0], [1, 0], [2, 1]]``: row h of W1, entry h of b1, column h of W2)."""
    starts = np.cumsum([0] + [math.prod(s) for s in layer_shapes])
    parts = []
    for li, axis in units:
        shape = layer_shapes[li]
        idx = torch.arange(math.prod(shape)).reshape(shape) + int(starts[li])
        parts.append(idx.movedim(axis, 0).reshape(shape[axis], -1))
    return torch.cat(parts, dim=1)


class Tokenizer(nn.Module):
    """Flat ``[B, P]`` <-> padded tokens ``[B, T, L]`` (L = the longest token; padding is zeros).

    Two kinds of token. *Chunks* (the paper): consecutive values of one layer, at most ``max_chunk``;
    each chunk has its own type, i.e. its own encoder, decoder and position embedding. *Units*
    (``units`` given): token h holds everything attached to hidden unit h (its incoming weights, bias
    and outgoing weights); all unit tokens share one type, so the model treats hidden units as a set and
    is exactly equivariant to permuting them, the network's own symmetry. Values not in a unit go into
    chunks. Both directions are one index operation.

    A token's decoder maps a width-D vector to its values, so a chunk longer than D can only be
    predicted inside a D-dimensional subspace: with 1,000-value chunks at width 128, CartPole's
    denoising loss at t < 10 stayed at 0.70 (0.065 with 128-value chunks). Unit tokens stay whole
    even when longer (mnist_mlp: 795 values): cutting them into width-sized pieces measured worse
    (docs/gpt-ablations.md)."""

    def __init__(self, layer_shapes: list[list[int]], max_chunk: int, units: list | None = None):
        super().__init__()
        sizes = [math.prod(s) for s in layer_shapes]
        self.n_params = sum(sizes)
        tokens, types = [], []
        covered = torch.zeros(self.n_params, dtype=torch.bool)
        if units:
            per_unit = unit_index(layer_shapes, units)
            tokens += list(per_unit)
            types += [0] * len(per_unit)
            covered[per_unit.reshape(-1)] = True
        for start, size, _ in chunk_layout(sizes, max_chunk):
            idx = torch.arange(start, start + size)
            idx = idx[~covered[idx]]
            if len(idx):
                tokens.append(idx)
                types.append(max(types, default=-1) + 1)
        self.n_tokens = len(tokens)
        self.n_types = max(types) + 1
        self.chunk_len = max(len(t) for t in tokens)
        gather = torch.full((self.n_tokens, self.chunk_len), self.n_params, dtype=torch.long)  # P = the zero pad
        scatter = torch.empty(self.n_params, dtype=torch.long)
        mask = torch.zeros(self.n_tokens, self.chunk_len)
        for k, idx in enumerate(tokens):
            gather[k, : len(idx)] = idx
            scatter[idx] = k * self.chunk_len + torch.arange(len(idx))
            mask[k, : len(idx)] = 1.0
        self.register_buffer("gather_index", gather, persistent=False)
        self.register_buffer("scatter_index", scatter, persistent=False)
        self.register_buffer("mask", mask, persistent=False)
        self.register_buffer("token_type", torch.tensor(types), persistent=False)

    def to_tokens(self, x: torch.Tensor) -> torch.Tensor:
        padded = torch.cat([x, x.new_zeros(x.shape[0], 1)], dim=1)
        return padded[:, self.gather_index]  # [B, T, L]

    def from_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens.reshape(tokens.shape[0], -1)[:, self.scatter_index]  # [B, P]


class UnitBasis(nn.Module):
    """A fixed orthonormal basis ``[k, d_in]`` for the hidden units' incoming weights (layer ``units[0]``,
    one row per unit), fitted on the training updates (``fit_unit_basis``) and saved with the model.

    ``reduce`` replaces each unit's d_in incoming weights by their k coordinates, ``expand`` maps k
    coordinates back to d_in weights. Why: a token's decoder emits at most ``width`` independent values,
    and mnist_mlp's units hold 784 incoming weights. Their SGD updates are sums of training images
    times back-propagated errors, so they share a low-dimensional span: the top 64 directions of 480
    training updates hold 88% of held-out runs' update energy, and replacing those runs' whole
    first-layer updates by their 64-coordinate projection moves their test error from 10.1% to 10.5%.
    A fitted basis gives the model that span from the start instead of leaving it to be learned."""

    def __init__(self, layer_shapes: list[list[int]], units: list, k: int):
        super().__init__()
        self.layer, axis = int(units[0][0]), int(units[0][1])
        self.n_units, self.d_in = layer_shapes[self.layer]
        if axis != 0 or len(layer_shapes[self.layer]) != 2 or not 0 < k < self.d_in:
            raise ValueError(f"unit_basis {k} needs a 2-d first unit layer with units along axis 0 and more than {k} inputs")
        self.k = k
        self.start = sum(math.prod(s) for s in layer_shapes[: self.layer])
        self.end = self.start + self.n_units * self.d_in
        self.register_buffer("basis", torch.zeros(k, self.d_in))  # persistent: saved with the weights

    def reduced_shapes(self, layer_shapes: list[list[int]]) -> list[list[int]]:
        return [[self.n_units, self.k] if i == self.layer else list(s) for i, s in enumerate(layer_shapes)]

    def reduce(self, x: torch.Tensor) -> torch.Tensor:
        rows = x[:, self.start : self.end].reshape(len(x), self.n_units, self.d_in)
        return torch.cat([x[:, : self.start], (rows @ self.basis.T).flatten(1), x[:, self.end :]], dim=1)

    def expand(self, z: torch.Tensor) -> torch.Tensor:
        mid = self.start + self.n_units * self.k
        coords = z[:, self.start : mid].reshape(len(z), self.n_units, self.k)
        return torch.cat([z[:, : self.start], (coords @ self.basis).flatten(1), z[:, mid:]], dim=1)


def fit_unit_basis(deltas: torch.Tensor, layer_shapes: list[list[int]], units: list, k: int) -> torch.Tensor:
    """The top-``k`` right singular vectors ``[k, d_in]`` of the units' incoming-weight updates in
    ``deltas [N, P]`` (normalised updates of training pairs): the directions holding most of their energy."""
    probe = UnitBasis(layer_shapes, units, k)
    rows = finite_rows(deltas[:, probe.start : probe.end].reshape(-1, probe.d_in).float())
    # the eigenvectors of the d_in x d_in Gram matrix are the right singular vectors: 25x faster than an SVD
    # of the [N x units, d_in] rows themselves (mnist_mlp: 0.4 s against 10 s on one thread)
    _, vectors = torch.linalg.eigh((rows.T @ rows).double())
    return vectors[:, -k:].flip(-1).T.float().contiguous()


class ChunkLinear(nn.Module):
    """Token-wise linear maps ``[B, T, d_in] -> [B, T, d_out]``, one weight per token *type*
    (``weight [n_types, d_in, d_out]``; token k uses ``weight[token_type[k]]``): each chunk its own
    encoder or decoder, computed as one batched matmul."""

    def __init__(self, token_type: torch.Tensor, d_in: int, d_out: int, std: float = 0.02):
        super().__init__()
        n_types = int(token_type.max()) + 1
        self.weight = nn.Parameter(torch.randn(n_types, d_in, d_out) * std)
        self.register_buffer("token_type", token_type.clone(), persistent=False)
        self.shared = n_types < len(token_type)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight[self.token_type] if self.shared else self.weight
        return torch.einsum("btc,tcd->btd", x, w)


# ------------------------------------------------------------------------------------------------
# scalar conditioning
# ------------------------------------------------------------------------------------------------


class FrequencyEmbedding(nn.Module):
    """A scalar ``s`` becomes ``[s, sin(pi f_k s), cos(pi f_k s)]`` for frequencies ``f_k`` spaced
    log-uniformly in ``[1, 2^max_freq_log2]``. Low frequencies let the model interpolate between metric
    values it has seen; high ones let it tell close values apart (too high and it can only memorise)."""

    def __init__(self, num_frequencies: int, max_freq_log2: float):
        super().__init__()
        self.register_buffer("freqs", math.pi * 2.0 ** torch.linspace(0.0, max_freq_log2, num_frequencies), persistent=False)
        self.dim = 2 * num_frequencies + 1

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        s = s.float().unsqueeze(-1)
        z = s * self.freqs
        return torch.cat([s, z.sin(), z.cos()], dim=-1)


# ------------------------------------------------------------------------------------------------
# transformer
# ------------------------------------------------------------------------------------------------


class Block(nn.Module):
    """Pre-LN transformer block without a causal mask: ``x + attn(LN(x))`` then ``x + mlp(LN(x))``.

    With ``adaln`` the two layer norms lose their own affine parameters; instead a conditioning vector
    ``c`` gives per-example shift, scale and a residual gate for each branch (DiT's adaLN-Zero: the
    gates start at zero, so every block starts as the identity)."""

    def __init__(self, width: int, heads: int, mlp_ratio: int, adaln: bool):
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(width, elementwise_affine=not adaln)
        self.ln2 = nn.LayerNorm(width, elementwise_affine=not adaln)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.mlp = nn.Sequential(nn.Linear(width, mlp_ratio * width), nn.GELU(), nn.Linear(mlp_ratio * width, width))
        self.modulation = nn.Linear(width, 6 * width) if adaln else None

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        # Written out rather than F.scaled_dot_product_attention: G.pt's sequences are short (11-70
        # tokens), where the fused CPU kernel is slower (bench/gpt.py attention). No mask: every token
        # sees every token.
        weights = (q @ k.transpose(-2, -1) * (D // self.heads) ** -0.5).softmax(dim=-1)
        return self.proj((weights @ v).transpose(1, 2).reshape(B, T, D))

    def forward(self, x: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
        if self.modulation is None:
            x = x + self.attention(self.ln1(x))
            return x + self.mlp(self.ln2(x))
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(c).unsqueeze(1).chunk(6, dim=-1)
        x = x + gate1 * self.attention(self.ln1(x) * (1 + scale1) + shift1)
        return x + gate2 * self.mlp(self.ln2(x) * (1 + scale2) + shift2)


class Gpt(nn.Module):
    """The G.pt denoiser.

    Tokens: the chunks of ``x_t`` and of ``start`` (2T tokens, or T when ``fuse_inputs`` concatenates the
    two chunks into one token), each through its own linear encoder, a LayerNorm and a learned position
    embedding; with ``conditioning="tokens"`` four more tokens carry the timestep, the start metric, the
    target metric and their difference. The transformer's outputs at x_t's token positions go through
    per-chunk linear decoders (initialised at zero) back to a flat vector. For ``target="params"`` the
    result is added to ``start`` (the global residual: an untrained model predicts "no change"); for
    ``target="delta"`` the diffusion variable already is the update, so the decoder output is used as is.
    """

    def __init__(self, config: GptConfig):
        super().__init__()
        self.config = config
        c = config
        shapes = [shape for _, shape in c.layers]
        self.unit_basis = UnitBasis(shapes, c.units, c.unit_basis) if c.unit_basis else None
        if self.unit_basis is not None:
            shapes = self.unit_basis.reduced_shapes(shapes)
        self.tokenizer = tok = Tokenizer(shapes, c.max_chunk, c.units or None)
        T, L, D, K = tok.n_tokens, tok.chunk_len, c.width, tok.n_types
        self.n_param_tokens = T
        if c.fuse_inputs:
            self.encode_fused = ChunkLinear(tok.token_type, 2 * L, D)
            pos = [tok.token_type]
        else:
            self.encode_x = ChunkLinear(tok.token_type, L, D)
            self.encode_start = ChunkLinear(tok.token_type, L, D)
            pos = [tok.token_type, K + tok.token_type]
        n_pos = K * len(pos)
        self.ln_in = nn.LayerNorm(D)
        self.embed_scalar = FrequencyEmbedding(c.num_frequencies, c.max_freq_log2)
        E = self.embed_scalar.dim
        # what stands for the target metric and its difference to the start when there is no prompt (NaN)
        self.no_prompt = nn.Parameter(torch.zeros(2, E)) if c.prompt_dropout > 0 else None
        if c.conditioning == "tokens":
            self.scalar_tokens = nn.ModuleList(nn.Linear(E, D) for _ in range(4))
            pos.append(n_pos + torch.arange(4))
            n_pos += 4
        else:
            self.cond_mlp = nn.Sequential(nn.Linear(4 * E, D), nn.SiLU(), nn.Linear(D, D), nn.SiLU())
            self.final_modulation = nn.Linear(D, 2 * D)
        # learned position embeddings, one per token type (hidden-unit tokens share theirs)
        self.pos_emb = nn.Parameter(torch.randn(n_pos, D) * 0.02)
        self.register_buffer("pos_index", torch.cat(pos), persistent=False)
        self.blocks = nn.ModuleList(Block(D, c.heads, c.mlp_ratio, c.conditioning == "adaln") for _ in range(c.depth))
        self.ln_out = nn.LayerNorm(D, elementwise_affine=c.conditioning == "tokens")
        self.decode = ChunkLinear(tok.token_type, D, L, std=0.0)  # zero init: the untrained model predicts "no change"
        self._init_weights()

    def _init_weights(self):
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        for b in self.blocks:
            if b.modulation is not None:
                nn.init.zeros_(b.modulation.weight)
                nn.init.zeros_(b.modulation.bias)
        if self.config.conditioning == "adaln":
            nn.init.zeros_(self.final_modulation.weight)
            nn.init.zeros_(self.final_modulation.bias)

    def flops_per_sample(self, training: bool = True) -> float:
        """Matmul FLOPs for one (x_t, start) sample: the chunk encoders and decoders, each block's
        projections, MLP and attention (as nanoGPT's ``estimate_mfu`` counts them); a training step is
        forward + backward = 3 forward passes. Small per-sample terms (conditioning) are left out."""
        c, tok = self.config, self.tokenizer
        T, L, D = tok.n_tokens, tok.chunk_len, c.width
        seq = T * (1 if c.fuse_inputs else 2) + (4 if c.conditioning == "tokens" else 0)
        io = 2 * (2 * L) * D * T + 2 * D * L * T  # encoders (x_t and start) + decoder
        blocks = c.depth * (2 * (4 + 2 * c.mlp_ratio) * D * D * seq + 4 * seq * seq * D)
        return float(io + blocks) * (3 if training else 1)

    def scalars(self, t, start_metric, target_metric) -> list[torch.Tensor]:
        """The four conditioning scalars, each embedded: ``[B, E]`` x 4. A NaN target means "no prompt"
        (models trained with ``prompt_dropout``): the target's two embeddings are the learned ``no_prompt``."""
        t = t.float() / self.config.timesteps
        s, g = start_metric.float(), target_metric.float()
        if self.no_prompt is None:
            return [self.embed_scalar(v) for v in (t, s, g, g - s)]
        free = g.isnan().unsqueeze(-1)
        g = torch.nan_to_num(g)
        emb = [self.embed_scalar(v) for v in (t, s, g, g - s)]
        return emb[:2] + [torch.where(free, self.no_prompt[k], e) for k, e in enumerate(emb[2:])]

    def guided(self, x_t, start, t, start_metric, target_metric, guidance: float) -> torch.Tensor:
        """Classifier-free guidance (Ho & Salimans, 2022): the prediction without the prompt moved
        ``guidance`` times as far as the prompt moves it, ``x0_free + w (x0_prompt - x0_free)``. The
        prompt's pull grows with w > 1 and the samples spread less around it; w = 1 is the plain model.
        Both predictions come from one forward pass over the doubled batch."""
        if guidance == 1.0:
            return self(x_t, start, t, start_metric, target_metric)
        if self.no_prompt is None:
            raise ValueError("guidance needs a model trained with prompt dropout (gptpipe train --prompt-dropout)")
        free = torch.full_like(target_metric, float("nan"))
        two = lambda a, b: torch.cat([a, b])
        prompted, unprompted = self(two(x_t, x_t), two(start, start), two(t, t), two(start_metric, start_metric),
                                    two(target_metric, free)).chunk(2)
        return unprompted + guidance * (prompted - unprompted)

    def forward(self, x_t, start, t, start_metric, target_metric) -> torch.Tensor:
        tok, basis = self.tokenizer, self.unit_basis
        xs = tok.to_tokens(x_t if basis is None else basis.reduce(x_t))
        ss = tok.to_tokens(start if basis is None else basis.reduce(start))
        if self.config.fuse_inputs:
            h = self.encode_fused(torch.cat([xs, ss], dim=-1))
        else:
            h = torch.cat([self.encode_x(xs), self.encode_start(ss)], dim=1)
        h = self.ln_in(h)
        emb = self.scalars(t, start_metric, target_metric)
        cond = None
        if self.config.conditioning == "tokens":
            h = torch.cat([h, torch.stack([proj(e) for proj, e in zip(self.scalar_tokens, emb)], dim=1)], dim=1)
        else:
            cond = self.cond_mlp(torch.cat(emb, dim=-1))
        h = h + self.pos_emb[self.pos_index]
        for block in self.blocks:
            h = block(h, cond)
        h = self.ln_out(h[:, : self.n_param_tokens])
        if cond is not None:
            shift, scale = self.final_modulation(cond).unsqueeze(1).chunk(2, dim=-1)
            h = h * (1 + scale) + shift
        out = tok.from_tokens(self.decode(h)).float()  # padding positions are dropped here
        if basis is not None:
            out = basis.expand(out)
        if self.config.target == "params":
            out = out + start
        return out


# ------------------------------------------------------------------------------------------------
# parameter normalisation
# ------------------------------------------------------------------------------------------------


def finite_rows(x: torch.Tensor) -> torch.Tensor:
    """The rows of ``x [n, d]`` without an inf or NaN (``x`` itself when all are): a row holding one sums
    to a non-finite value, a reduction instead of an ``[n, d]`` mask (13x faster on mnist_mlp rows)."""
    finite = torch.isfinite(x.sum(1))
    return x if bool(finite.all()) else x[finite]


def layer_rms(blocks, layer_sizes: list[int], mode: str = "layer") -> list[float]:
    """Root mean square of each layer's values (``mode="global"``: one for all layers) over the finite
    rows of the ``[n, P]`` tensors ``blocks`` yields."""
    bounds = np.cumsum([0] + list(layer_sizes))
    squares, count = np.zeros(len(layer_sizes)), 0
    for x in blocks:
        x = finite_rows(x)
        # column sums of squares in the values' precision over at most a block's rows, then per layer in
        # float64: as exact as squaring in float64 for these sizes, 3x faster than a float64 copy
        columns = x.pow(2).sum(0)
        squares += [float(columns[a:b].double().sum()) for a, b in zip(bounds[:-1], bounds[1:])]
        count += len(x)
    sizes = np.asarray(layer_sizes, dtype=np.float64)
    if mode == "global":
        return [max(float(np.sqrt(squares.sum() / max(count * sizes.sum(), 1))), 1e-8)] * len(layer_sizes)
    return [max(float(np.sqrt(s / max(count * n, 1))), 1e-8) for s, n in zip(squares, sizes)]


class Normalizer:
    """Raw parameters <-> the diffusion variable, with per-layer scales fitted on the training data and
    kept in ``GptConfig`` (so a saved model de-normalises by itself).

    - ``normalize(theta) = theta * param_scale`` (per layer; "global" fits one number for all layers),
      making every layer's values unit-variance across the training checkpoints.
    - ``target="delta"``: the clean diffusion variable is ``x0 = (norm(theta_j) - norm(theta_i)) / delta_scale``,
      the update rescaled to unit variance per layer, so the diffusion noise matches the size of
      real updates instead of the size of the weights.
    """

    def __init__(self, config: GptConfig, device=None):
        sizes = config.layer_sizes
        rep = lambda v: torch.tensor(np.repeat(np.asarray(v, dtype=np.float32), sizes), device=device)
        self.target = config.target
        self.param_scale = rep(config.param_scale or [1.0] * len(sizes))
        self.delta_scale = rep(config.delta_scale or [1.0] * len(sizes))

    def to(self, device) -> "Normalizer":
        self.param_scale, self.delta_scale = self.param_scale.to(device), self.delta_scale.to(device)
        return self

    def normalize(self, theta: torch.Tensor) -> torch.Tensor:
        return theta * self.param_scale

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        return z / self.param_scale

    def x0(self, theta_j_n: torch.Tensor, theta_i_n: torch.Tensor) -> torch.Tensor:
        """The clean diffusion variable for a normalised pair (start i, target j)."""
        if self.target == "params":
            return theta_j_n
        return (theta_j_n - theta_i_n) / self.delta_scale

    def params(self, x0: torch.Tensor, theta_i_n: torch.Tensor) -> torch.Tensor:
        """Inverse of ``x0``: normalised target parameters."""
        if self.target == "params":
            return x0
        return theta_i_n + x0 * self.delta_scale

    @staticmethod
    def fit(params: torch.Tensor, layer_sizes: list[int], mode: str = "layer", generator: torch.Generator | None = None,
            n_pairs: int = 4096, pairs: tuple | None = None) -> tuple[list[float], list[float], torch.Tensor]:
        """``(param_scale, delta_scale, updates)`` from training checkpoints ``params [R, C, P]`` (finite
        rows). ``pairs = (run, i, j)`` index tensors: the pairs training will draw (default: uniform i < j);
        ``updates [n_pairs, P]``: their updates in normalised parameters (what ``fit_unit_basis`` reads)."""
        if mode not in ("layer", "global"):
            raise ValueError(f"normalisation must be 'layer' or 'global', not {mode!r}")
        # in blocks of rows: the mnist_mlp demo's 5.2 GB of checkpoints get no full-size temporary copy
        flat = params.reshape(-1, params.shape[-1])
        param_scale = [1.0 / s for s in layer_rms((flat[a : a + 2048] for a in range(0, len(flat), 2048)), layer_sizes, mode)]
        R, C, _ = params.shape
        if pairs is None:
            r = torch.randint(0, R, (n_pairs,), generator=generator)
            i = torch.randint(0, C - 1, (n_pairs,), generator=generator)
            j = i + 1 + (torch.rand(n_pairs, generator=generator) * (C - 1 - i)).long()
        else:
            r, i, j = pairs
        updates = params[r, j].sub_(params[r, i]).mul_(torch.tensor(np.repeat(param_scale, layer_sizes), dtype=params.dtype))
        return param_scale, layer_rms([updates], layer_sizes, mode), updates

