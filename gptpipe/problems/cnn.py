"""The paper's CIFAR-10 network, batched: K networks as one computation through grouped convolutions.

Network (``module()``, flat order = its ``state_dict`` order, 5,370 parameters)::

    nn.Sequential(
        nn.Conv2d(3, 16, 3, stride=2, padding=1, bias=False),   # 0.weight [16, 3, 3, 3]   32x32 -> 16x16
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=1, padding=1, bias=False),  # 2.weight [32, 16, 3, 3]  16x16 -> 16x16
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),                                # global average pool
        nn.Flatten(),
        nn.Linear(32, 10),                                      # 6.weight [10, 32], 6.bias [10]
    )

Inputs are the data set's flat rows ``[..., 3072]`` in CIFAR's own channel-major order (3 x 32 x 32),
normalised per channel (``gptpipe.data``). Batching: network k's images become channels
``3k .. 3k+2`` of one image batch and its filters group k of a convolution with ``groups=K``
(measured faster than ``torch.func.vmap`` over ``functional_call`` here: ``bench/cnn_batching.py``).

Training augmentation (training only; metrics are computed on the un-augmented images): each image is
zero-padded by 4 pixels on every side (zero = the channel mean after normalisation), a random 32x32
window is cut out (offsets 0-8 in each direction) and it is flipped left-right with probability 1/2.
Network k draws its own augmentation from its own generator, after that epoch's data order:
``flip = rand(B) < 0.5`` then ``offsets = randint(0, 9, (2, B))`` (rows: dy, dx) for every batch.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from gptpipe.problems.base import Classifier, Layer, cross_entropy

SIDE, PAD = 32, 4


class ConvClassifier(Classifier):
    """The paper's CIFAR-10 network, K of them as one grouped convolution."""

    # G.pt's CIFAR-10 recipe: SGD Nesterov 0.9, weight decay 5e-4, batch 128, cosine, 50 epochs
    # (the per-run lr range is the sweep's, around the paper's 0.1)
    recipe = dict(epochs=50, lr_min=0.01, lr_max=0.3, momentum=0.9, nesterov=True, weight_decay=5e-4,
                  batch_size=128, schedule="cosine")
    settings = {"augmentation": "pad 4 (zeros after normalisation), random 32x32 crop, horizontal flip p=0.5; "
                                "per network: rand(B) < 0.5 then randint(0, 9, (2, B)) from its generator per batch",
                "padding": "conv1 stride 2 padding 1, conv2 stride 1 padding 1"}

    def __init__(self, name: str, channels: tuple[int, int] = (16, 32), classes: int = 10,
                 default_data: str = "cifar10", data_sources: tuple[str, ...] = ("cifar10",)):
        self.name = name
        self.c1, self.c2 = channels
        self.classes = classes
        self.default_data = default_data
        self.data_sources = data_sources
        self.layers = (
            Layer("0.weight", (self.c1, 3, 3, 3)),
            Layer("2.weight", (self.c2, self.c1, 3, 3)),
            Layer("6.weight", (classes, self.c2)),
            Layer("6.bias", (classes,)),
        )
        self.n_units = (self.c1, self.c2)  # the two hidden layers' channels, what ``permute`` shuffles

    def module(self) -> nn.Module:
        return nn.Sequential(
            nn.Conv2d(3, self.c1, 3, stride=2, padding=1, bias=False), nn.ReLU(),
            nn.Conv2d(self.c1, self.c2, 3, stride=1, padding=1, bias=False), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(self.c2, self.classes),
        )

    # --- init ---------------------------------------------------------------------------------
    def init(self, generators: list[torch.Generator]) -> torch.Tensor:
        """PyTorch's default init of these modules: every value uniform in +-1/sqrt(fan_in), fan_in =
        in_channels * 3 * 3 for the convolutions, 32 for the linear layer's weight and bias."""
        theta = torch.empty(len(generators), self.n_params)
        fans = [3 * 9, self.c1 * 9, self.c2, self.c2]
        for k, g in enumerate(generators):
            start = 0
            for layer, fan_in in zip(self.layers, fans):
                bound = 1.0 / math.sqrt(fan_in)
                theta[k, start : start + layer.numel].uniform_(-bound, bound, generator=g)
                start += layer.numel
        return theta

    # --- augmentation -------------------------------------------------------------------------
    def augment(self, x: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
        """Random crop (pad 4) and horizontal flip of network k's batch ``x [K, B, 3072]``, drawn from
        ``generators[k]`` (see the module docstring for the exact draws)."""
        K, B = x.shape[:2]
        flips, offsets = [], []
        for g in generators:
            flips.append(torch.rand(B, generator=g) < 0.5)
            offsets.append(torch.randint(0, 2 * PAD + 1, (2, B), generator=g))
        flip = torch.cat(flips)  # [K*B]
        dy, dx = torch.cat(offsets, dim=1)  # [K*B] each
        padded = F.pad(x.reshape(K * B, 3, SIDE, SIDE), (PAD, PAD, PAD, PAD))
        ar = torch.arange(SIDE)
        rows = dy[:, None] + ar  # [KB, 32]
        cols = torch.where(flip[:, None], dx[:, None] + (SIDE - 1) - ar, dx[:, None] + ar)
        n = torch.arange(K * B)[:, None, None, None]
        c = torch.arange(3)[None, :, None, None]
        out = padded[n, c, rows[:, None, :, None], cols[:, None, None, :]]
        return out.reshape(K, B, 3 * SIDE * SIDE)

    # --- compute ------------------------------------------------------------------------------
    def _pool_features(self, w1, w2, images: torch.Tensor, shared: bool) -> torch.Tensor:
        """Pooled conv features ``[B, n, c2]`` of n networks. ``images``: ``[B, 3n, 32, 32]`` (network
        k's own images in channels 3k..3k+2) or, when ``shared``, ``[B, 3, 32, 32]`` seen by all."""
        n = w1.shape[0]
        if shared:  # all n networks see the same images: one ordinary convolution with n*c1 filters
            h = F.conv2d(images, w1.reshape(n * self.c1, 3, 3, 3), stride=2, padding=1)
        else:
            h = F.conv2d(images, w1.reshape(n * self.c1, 3, 3, 3), stride=2, padding=1, groups=n)
        h = F.conv2d(h.relu_(), w2.reshape(n * self.c2, self.c1, 3, 3), padding=1, groups=n).relu_()
        return h.mean((2, 3)).view(images.shape[0], n, self.c2)

    def logits(self, theta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Network k applied to its own batch: ``theta [K, P]``, ``x [K, B, 3072]`` -> ``[K, B, classes]``."""
        K, B = x.shape[:2]
        w1, w2, w3, b3 = self.unflatten(theta)
        images = x.reshape(K, B, 3, SIDE, SIDE).transpose(0, 1).reshape(B, K * 3, SIDE, SIDE)
        feats = self._pool_features(w1, w2, images, shared=False).transpose(0, 1)  # [K, B, c2]
        return torch.baddbmm(b3.unsqueeze(1), feats, w3.transpose(1, 2))

    def loss(self, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return cross_entropy(self.logits(theta, x), y).mean(1)

    @torch.no_grad()
    def evaluate(self, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor, chunk: int = 64,
                 budget: int = 1 << 23) -> dict[str, torch.Tensor]:
        """Mean cross-entropy and error of each of N vectors on one shared split ``x [M, 3072]``, in
        chunks of ``chunk`` networks x as many images as keep the largest activation under ``budget``
        values."""
        losses, errors = [], []
        images_all = x.reshape(-1, 3, SIDE, SIDE)
        for part in theta.split(chunk):
            n = part.shape[0]
            w1, w2, w3, b3 = self.unflatten(part)
            rows = max(1, budget // (n * self.c2 * (SIDE // 2) ** 2))
            loss_sum, wrong = torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
            for start in range(0, len(images_all), rows):
                imgs, yy = images_all[start : start + rows], y[start : start + rows]
                feats = self._pool_features(w1, w2, imgs, shared=True).transpose(0, 1)  # [n, b, c2]
                z = torch.baddbmm(b3.unsqueeze(1), feats, w3.transpose(1, 2))
                loss_sum += cross_entropy(z, yy.expand(n, -1)).double().sum(1)
                wrong += (z.argmax(-1) != yy).double().sum(1)
            losses.append((loss_sum / len(y)).float())
            errors.append((wrong / len(y)).float())
        return {"loss": torch.cat(losses), "error": torch.cat(errors)}

    # --- symmetry -----------------------------------------------------------------------------
    def sample_permutation(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` random orderings of both hidden layers' channels, ``[n, c1 + c2]``: columns ``:c1``
        order conv1's output channels, columns ``c1:`` (values 0..c2-1) conv2's."""
        p1 = torch.argsort(torch.rand(n, self.c1, generator=generator), dim=1)
        p2 = torch.argsort(torch.rand(n, self.c2, generator=generator), dim=1)
        return torch.cat([p1, p2], dim=1)

    def permute(self, theta: torch.Tensor, generator: torch.Generator | None = None, perm: torch.Tensor | None = None) -> torch.Tensor:
        """Shuffle each network's conv1 and conv2 channels (the same function: ReLU and average pooling
        act per channel). ``perm`` as from ``sample_permutation``; the same ``perm`` permutes several
        tensors jointly."""
        n = theta.shape[0]
        if perm is None:
            perm = self.sample_permutation(n, generator)
        perm = perm.to(theta.device)
        p1, p2 = perm[:, : self.c1], perm[:, self.c1 :]
        w1, w2, w3, b3 = self.unflatten(theta)
        w1 = torch.gather(w1, 1, p1[:, :, None, None, None].expand_as(w1))
        w2 = torch.gather(w2, 1, p2[:, :, None, None, None].expand_as(w2))  # conv2 outputs
        w2 = torch.gather(w2, 2, p1[:, None, :, None, None].expand_as(w2))  # conv2 inputs
        w3 = torch.gather(w3, 2, p2[:, None, :].expand_as(w3))
        return torch.cat([w1.reshape(n, -1), w2.reshape(n, -1), w3.reshape(n, -1), b3], dim=1)
