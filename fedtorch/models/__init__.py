"""Models: plain ``nn.Module`` classes whose constructor arguments are the YAML keys.

``input_shape`` and ``num_classes`` are filled in from the dataset by the builder when the
constructor accepts them, so a user's own model needs neither.
"""

from fedtorch.models.cnn import McMahanCNN, SimpleCNN
from fedtorch.models.mlp import MLP
from fedtorch.models.resnet import ResNet18

__all__ = ["MLP", "McMahanCNN", "ResNet18", "SimpleCNN"]
