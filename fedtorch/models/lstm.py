"""Character-level LSTM language model (McMahan et al. 2017; TFF and Reddi et al. 2021).

Embedding of 8, two LSTM layers of 256 units, a dense layer to the vocabulary: 822,570
parameters for Shakespeare's 90 token ids. Returns logits [B, T, V], one prediction per
position.
"""

from __future__ import annotations

import torch
from torch import nn


class CharLSTM(nn.Module):
    """Embedding -> LSTM x ``num_layers`` -> linear, over token ids [B, T].

    Args:
        vocab_size: token ids in [0, vocab_size) (filled in from the dataset).
        embedding_dim: size of a character's embedding.
        hidden_size: units of each LSTM layer.
        num_layers: stacked LSTM layers.
    """

    def __init__(
        self,
        vocab_size: int = 90,
        embedding_dim: int = 8,
        hidden_size: int = 256,
        num_layers: int = 2,
    ) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, embedding_dim)
        self.lstm = nn.LSTM(embedding_dim, hidden_size, num_layers, batch_first=True)
        self.head = nn.Linear(hidden_size, vocab_size)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        hidden, _ = self.lstm(self.embedding(tokens))
        return self.head(hidden)
