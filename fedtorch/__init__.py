"""fedtorch: fast, exact federated learning simulation in PyTorch."""

from fedtorch.errors import ConfigError, DataError, FedtorchError

__version__ = "0.1.0"
__all__ = ["ConfigError", "DataError", "FedtorchError", "__version__"]
