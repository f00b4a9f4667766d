"""The client's side of a round: local training of one client and what shapes it.

* :mod:`~fedtorch.client.trainer`: :class:`ClientTrainer`, local SGD/Adam from the global
  weights (the strategy's client terms, local keys, mixed precision, DataLoaders).
* :mod:`~fedtorch.client.dpsgd`: DP-SGD local training (per-sample clipping, Opacus).
* :mod:`~fedtorch.client.heterogeneity`: system heterogeneity (local work, drop-outs).
* :mod:`~fedtorch.client.attacks`: simulated malicious clients.

May import: the leaves, :mod:`fedtorch.data`, :mod:`fedtorch.models`,
:mod:`fedtorch.privacy` (accounting); never the engines, server or config.
"""
