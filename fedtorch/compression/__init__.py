"""Communication compression: update compressors and the ``compression`` config group.

May import the leaves, :mod:`fedtorch.strategies` and :mod:`fedtorch.pipeline`.
"""

from fedtorch.compression.channel import DOWNLINK_KINDS, KINDS, Compression, make_compressor
from fedtorch.compression.compressors import Compressor, Encoded

__all__ = ["DOWNLINK_KINDS", "KINDS", "Compression", "Compressor", "Encoded", "make_compressor"]
