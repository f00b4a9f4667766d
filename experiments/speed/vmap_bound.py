"""What bounds the vectorized engine on a CPU: one training step of K clients of the 2NN.

Times, for K clients with B=10 samples each:
  - vmap(grad): the vectorized engine's step (each client has its own weights);
  - K separate steps of one client (what the sequential engines do);
  - one step of a single model on K*B samples (shared weights: the "compute floor").

    python experiments/speed/vmap_bound.py
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap

from fedtorch.models import MLP


def per_call_ms(fn, repeats: int = 50) -> float:
    fn()
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats * 1000


def measure(k: int, batch: int = 10) -> None:
    """Print the three timings for a cohort of ``k`` clients."""
    model = MLP()
    params = {
        n: p.detach().unsqueeze(0).repeat(k, *[1] * p.ndim) for n, p in model.named_parameters()
    }
    x = torch.randn(k, batch, 1, 28, 28)
    y = torch.randint(0, 10, (k, batch))

    def loss_fn(p, xb, yb):
        return F.cross_entropy(functional_call(model, p, (xb,)), yb)

    step = vmap(grad(loss_fn))
    vectorized = per_call_ms(lambda: step(params, x, y))

    single = MLP()

    def one_client():
        loss = F.cross_entropy(single(x[0]), y[0])
        single.zero_grad()
        loss.backward()

    separate = k * per_call_ms(one_client)
    shared = MLP()
    xb, yb = x.reshape(k * batch, 1, 28, 28), y.reshape(-1)

    def one_big_batch():
        loss = F.cross_entropy(shared(xb), yb)
        shared.zero_grad()
        loss.backward()

    floor = per_call_ms(one_big_batch)
    print(
        f"K={k:3d}: vmap(grad) {vectorized:6.2f} ms | {k} separate client steps "
        f"{separate:6.2f} ms | shared weights, batch {k * batch}: {floor:5.2f} ms"
    )


def main() -> None:
    torch.manual_seed(0)
    for k in (10, 100):
        measure(k)


if __name__ == "__main__":
    main()
