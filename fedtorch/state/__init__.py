"""Model state as data every room shares (a leaf: imports only :mod:`fedtorch.errors`).

* :mod:`~fedtorch.state.layout`: a ``state_dict`` flattened into one vector, with each
  key's aggregation rule (``mean``, ``max``, ``keep``, ``local``).
* :mod:`~fedtorch.state.client_store`: per-client vectors kept across rounds, in memory
  or in a sparse file (SCAFFOLD's control variates, FedDyn's state, error-feedback
  residuals).
"""
