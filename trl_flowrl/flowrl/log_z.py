"""The learnable log-partition function log Z(x) of FlowRL, and the pooling of its input."""

import torch
from torch import nn


class LogZHead(nn.Module):
    """log Z(x) from a pooled prompt representation: `(num_layers - 1)` blocks of `Linear(h, h) → GELU → LayerNorm →
    Dropout`, then `Linear(h, 1)`. The output is log Z itself, unconstrained.

    Input (B, h) float, output (B,).
    """

    def __init__(self, hidden_size: int, num_layers: int = 3, dropout: float = 0.1):
        super().__init__()
        layers = []
        for _ in range(num_layers - 1):
            layers += [nn.Linear(hidden_size, hidden_size), nn.GELU(), nn.LayerNorm(hidden_size), nn.Dropout(dropout)]
        layers.append(nn.Linear(hidden_size, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, prompt_representation: torch.Tensor) -> torch.Tensor:
        return self.net(prompt_representation).squeeze(-1)


def pool_prompt(hidden_states: torch.Tensor, prompt_mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """Pool the final hidden states of the prompt positions into one vector per sequence.

    Args:
        hidden_states: (B, P, h) hidden states of the P prompt positions (prompts are left-padded, as in TRL).
        prompt_mask: (B, P) 1 on prompt tokens, 0 on left padding.
        pooling: "mean" (masked mean over prompt tokens) or "last" (the last prompt position, P - 1, which is always a
            real token under left padding).

    Returns:
        (B, h) in float32.
    """
    hidden_states = hidden_states.float()
    if pooling == "mean":
        mask = prompt_mask.to(hidden_states.dtype).unsqueeze(-1)
        return (hidden_states * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
    if pooling == "last":
        return hidden_states[:, -1]
    raise ValueError(f"pooling must be 'mean' or 'last', got {pooling!r}")
