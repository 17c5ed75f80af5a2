"""K CIFAR CNNs, one training step (forward + backward) each on its own batch of 128: grouped
convolutions (gptpipe.cnn) against torch.func.vmap over functional_call, one thread.

    python bench/cnn_batching.py [--k 16] [--reps 5]
"""

import argparse
import time

import torch
from torch.func import functional_call, grad, vmap

from gptpipe import problems

parser = argparse.ArgumentParser()
parser.add_argument("--k", type=int, default=16)
parser.add_argument("--reps", type=int, default=5)
args = parser.parse_args()
torch.set_num_threads(1)
problem = problems.get("cifar_cnn")
K, B = args.k, 128
theta = problem.init([torch.Generator().manual_seed(i) for i in range(K)])
x, y = torch.randn(K, B, 3072), torch.randint(0, 10, (K, B))


def grouped():
    t = theta.clone().requires_grad_(True)
    return torch.autograd.grad(problem.loss(t, x, y).sum(), t)[0]


module = problem.module()


def one_loss(vec, xb, yb):
    params = {layer.name: p[0] for layer, p in zip(problem.layers, problem.unflatten(vec.unsqueeze(0)))}
    logits = functional_call(module, params, (xb.view(-1, 3, 32, 32),))
    return torch.nn.functional.cross_entropy(logits, yb)


vmapped = lambda: vmap(grad(one_loss))(theta, x, y)
torch.testing.assert_close(grouped(), vmapped(), atol=1e-5, rtol=1e-4)
for name, fn in (("grouped conv", grouped), ("vmap", vmapped)):
    fn()
    t0 = time.perf_counter()
    for _ in range(args.reps):
        fn()
    dt = (time.perf_counter() - t0) / args.reps
    print(f"{name:13s} K={K}: {dt * 1e3:7.1f} ms per step, {K * B / dt:7.0f} images/s")
