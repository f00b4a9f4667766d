"""A decoder-only transformer language model, small enough to read in one file.

The GPT-2 layout (Radford et al. 2019) as nanoGPT writes it: token and position embeddings,
``n_layer`` pre-norm blocks (causal self-attention, then a 4x MLP with GELU, each with a
residual connection), a final LayerNorm, and output logits computed with the token
embedding's weight (tied embeddings: one tensor in the ``state_dict``, exchanged once).
Attention uses ``scaled_dot_product_attention`` with a causal mask. Inputs are token ids
[B, T] with T <= ``block_size``; outputs are logits [B, T, V].
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from fedtorch.errors import ConfigError


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention where position t sees positions <= t."""

    def __init__(self, n_embd: int, n_head: int, dropout: float, bias: bool) -> None:
        super().__init__()
        self.qkv = nn.Linear(n_embd, 3 * n_embd, bias=bias)
        self.proj = nn.Linear(n_embd, n_embd, bias=bias)
        self.n_head = n_head
        self.dropout = dropout
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(x).split(c, dim=2)
        q, k, v = (z.view(b, t, self.n_head, c // self.n_head).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True
        )
        return self.resid_dropout(self.proj(y.transpose(1, 2).reshape(b, t, c)))


class Block(nn.Module):
    """LayerNorm -> attention -> residual; LayerNorm -> MLP -> residual."""

    def __init__(self, n_embd: int, n_head: int, dropout: float, bias: bool) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd, bias=bias)
        self.attn = CausalSelfAttention(n_embd, n_head, dropout, bias)
        self.ln_2 = nn.LayerNorm(n_embd, bias=bias)
        self.mlp = nn.Sequential(
            nn.Linear(n_embd, 4 * n_embd, bias=bias),
            nn.GELU(),
            nn.Linear(4 * n_embd, n_embd, bias=bias),
            nn.Dropout(dropout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """Decoder-only transformer with tied input and output embeddings.

    Args:
        vocab_size: token ids in [0, vocab_size) (filled in from the dataset).
        n_layer: transformer blocks.
        n_head: attention heads per block (must divide ``n_embd``).
        n_embd: width of the residual stream.
        block_size: longest sequence the position embedding covers.
        dropout: dropout on attention weights, residual branches and embeddings.
        bias: biases in the linear layers and LayerNorms.

    Raises:
        ConfigError: a size is not positive or ``n_head`` does not divide ``n_embd``.
    """

    def __init__(
        self,
        vocab_size: int = 90,
        n_layer: int = 4,
        n_head: int = 4,
        n_embd: int = 128,
        block_size: int = 128,
        dropout: float = 0.0,
        bias: bool = True,
    ) -> None:
        super().__init__()
        for key, value in (
            ("n_layer", n_layer),
            ("n_head", n_head),
            ("n_embd", n_embd),
            ("block_size", block_size),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"model.{key}", f"must be an integer >= 1, got {value!r}")
        if n_embd % n_head:
            raise ConfigError("model.n_head", f"must divide n_embd={n_embd}, got {n_head}")
        if not 0 <= dropout < 1:
            raise ConfigError("model.dropout", f"must be in [0, 1), got {dropout!r}")
        self.block_size = block_size
        self.token_embedding = nn.Embedding(vocab_size, n_embd)
        self.position_embedding = nn.Embedding(block_size, n_embd)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(n_embd, n_head, dropout, bias) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd, bias=bias)
        self.apply(self._init_weights)
        for name, param in self.named_parameters():  # GPT-2's scaled residual projections
            if name.endswith(("attn.proj.weight", "mlp.2.weight")):
                nn.init.normal_(param, mean=0.0, std=0.02 / math.sqrt(2 * n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        t = tokens.shape[-1]
        if t > self.block_size:
            raise ValueError(f"sequence of {t} tokens is longer than block_size={self.block_size}")
        positions = torch.arange(t, device=tokens.device)
        x = self.drop(self.token_embedding(tokens) + self.position_embedding(positions))
        for block in self.blocks:
            x = block(x)
        return F.linear(self.ln_f(x), self.token_embedding.weight)
