"""Models: plain ``nn.Module`` classes whose constructor arguments are the YAML keys.

``input_shape`` and ``num_classes`` (and ``vocab_size`` for a language-model dataset) are
filled in from the dataset by the builder when the constructor accepts them, so a user's own
model needs none of them.

Adapters (LoRA through peft) live in :mod:`~fedtorch.models.adapters`.

May import only the leaves.
"""

from fedtorch.models.cnn import McMahanCNN, SimpleCNN
from fedtorch.models.gpt import GPT
from fedtorch.models.hf import HuggingFaceModel
from fedtorch.models.lstm import CharLSTM
from fedtorch.models.mlp import MLP
from fedtorch.models.resnet import ResNet18

__all__ = ["GPT", "CharLSTM", "HuggingFaceModel", "MLP", "McMahanCNN", "ResNet18", "SimpleCNN"]
