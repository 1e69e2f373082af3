"""A decoder-only transformer (GPT): token embedding, learned or rotary positions, pre-norm blocks of causal
self-attention and a GELU MLP, a final norm and a language-model head (optionally tied to the embedding)."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from trainrun.errors import ConfigError, DataError

ROPE_BASE = 10000.0  # RoFormer / GPT-NeoX / Llama's rotary base


def gpt(cfg, input_shape, num_classes: int, dropout: float) -> nn.Module:
    """GPT: width, layers, heads, mlp_ratio, norm, positions, tie_weights, bias from model.*; the context is
    input_shape[0] (data.block_size), the vocabulary num_classes."""
    check_shape(cfg)
    return GPT(vocab_size=num_classes, block_size=context_length(input_shape, "model=gpt"), width=cfg.width,
               layers=cfg.layers, heads=cfg.heads, mlp_ratio=cfg.mlp_ratio, norm=cfg.norm, positions=cfg.positions,
               tie_weights=cfg.tie_weights, bias=cfg.bias, dropout=dropout)


gpt.config_keys = ("width", "layers", "heads", "mlp_ratio", "norm", "positions", "tie_weights", "bias")


def check_shape(cfg) -> None:
    """The GPT's own rules of the model section (called from trainrun.models.check and by the factory)."""
    if cfg.norm not in ("layernorm", "rmsnorm"):
        raise ConfigError(f"model.norm={cfg.norm}: the GPT takes layernorm or rmsnorm")
    if cfg.positions not in ("learned", "rotary"):
        raise ConfigError(f"model.positions={cfg.positions}: the GPT takes learned (a position table) or rotary "
                          "(RoPE on queries and keys)")
    if cfg.width % cfg.heads:
        raise ConfigError(f"model.width={cfg.width} must be divisible by model.heads={cfg.heads} (each head gets "
                          "width / heads channels); change one of them")
    if cfg.positions == "rotary" and (cfg.width // cfg.heads) % 2:
        raise ConfigError(f"model.positions=rotary rotates channel pairs, and the head dim model.width / "
                          f"model.heads = {cfg.width // cfg.heads} is odd; choose an even width / heads")


def context_length(input_shape, what: str) -> int:
    """The block size of a language model's input shape (block_size,); refuses image-shaped inputs."""
    shape = tuple(input_shape)
    if len(shape) != 1 or int(shape[0]) < 1:
        raise ConfigError(f"{what} reads token sequences, and the data gives samples of shape {list(shape)}; use "
                          "data=text with task=causal_lm (its samples are data.block_size tokens)")
    return int(shape[0])


def make_norm(kind: str, width: int, bias: bool) -> nn.Module:
    if kind == "rmsnorm":
        return nn.RMSNorm(width, eps=1e-5)
    return nn.LayerNorm(width, eps=1e-5, bias=bias)


def rotary_angles(length: int, head_dim: int, device=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [length, head_dim] of RoPE (Su et al. 2021) in the rotate-half layout of GPT-NeoX / Llama:
    channel i and i + head_dim/2 form a pair turned by position * base^(-2i/head_dim). Computed per forward, in
    float32, so there is no buffer to save, to move or to build on the meta device."""
    inv_freq = 1.0 / (ROPE_BASE ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.int64).float()
                                    / head_dim))
    angles = torch.outer(torch.arange(length, device=device, dtype=torch.float32), inv_freq)
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [..., T, head_dim] by the angles of its positions."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


class CausalSelfAttention(nn.Module):
    def __init__(self, width: int, heads: int, bias: bool, dropout: float):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.qkv = nn.Linear(width, 3 * width, bias=bias)
        self.proj = nn.Linear(width, width, bias=bias)
        self.proj._residual_projection = True  # init=gpt2: std / sqrt(2 * layers)
        self.residual_dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, rope: Optional[Tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
        n, t, c = x.shape
        q, k, v = self.qkv(x).view(n, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        if rope is not None:
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0,
                                           is_causal=True)
        return self.residual_dropout(self.proj(y.transpose(1, 2).reshape(n, t, c)))


class MLP(nn.Module):
    def __init__(self, width: int, hidden: int, bias: bool, dropout: float):
        super().__init__()
        self.fc = nn.Linear(width, hidden, bias=bias)
        self.act = nn.GELU()
        self.proj = nn.Linear(hidden, width, bias=bias)
        self.proj._residual_projection = True
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.proj(self.act(self.fc(x))))


class Block(nn.Module):
    """Pre-norm: x + attention(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, norm: str, bias: bool, dropout: float):
        super().__init__()
        self.norm1 = make_norm(norm, width, bias)
        self.attn = CausalSelfAttention(width, heads, bias, dropout)
        self.norm2 = make_norm(norm, width, bias)
        self.mlp = MLP(width, int(width * mlp_ratio), bias, dropout)

    def forward(self, x: torch.Tensor, rope: Optional[Tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), rope)
        return x + self.mlp(self.norm2(x))


class GPT(nn.Module):
    """forward(tokens int64 [N, T]) -> logits [N, T, vocab_size], for any T <= block_size."""

    input_dtype = torch.long  # what the model takes: token ids (the image models take float tensors)

    def __init__(self, vocab_size: int, block_size: int, width: int, layers: int, heads: int, mlp_ratio: float,
                 norm: str = "layernorm", positions: str = "learned", tie_weights: bool = True, bias: bool = True,
                 dropout: float = 0.0):
        super().__init__()
        self.block_size, self.head_dim = block_size, width // heads
        # The embedding is registered before the head: with tied weights the shared Parameter is then named
        # token_embedding.weight, which the optimizer's no-decay rule recognises as an embedding.
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.position_embedding = nn.Embedding(block_size, width) if positions == "learned" else None
        self.dropout = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(width, heads, mlp_ratio, norm, bias, dropout) for _ in range(layers))
        self.norm = make_norm(norm, width, bias)
        self.head = nn.Linear(width, vocab_size, bias=False)
        if tie_weights:
            self.head.weight = self.token_embedding.weight
        self.num_layers = layers  # init=gpt2 scales the marked projections by 1 / sqrt(2 * num_layers)
        # GPT-2's own init, as nanoGPT and transformers build the model (init=default keeps it): torch's defaults
        # would give the tied embedding N(0, 1) and a first loss many times ln(vocab)
        from trainrun.init import gpt2_init

        with torch.no_grad():
            gpt2_init(self)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        t = tokens.shape[-1]
        if t > self.block_size:
            raise DataError(f"a sequence of {t} tokens is longer than the GPT's context of {self.block_size} "
                            "(data.block_size); crop it to the last block_size tokens")
        x = self.token_embedding(tokens)
        rope = None
        if self.position_embedding is not None:
            x = x + self.position_embedding(torch.arange(t, device=tokens.device))
        else:
            rope = rotary_angles(t, self.head_dim, device=tokens.device)
        x = self.dropout(x)
        for block in self.blocks:
            x = block(x, rope)
        return self.head(self.norm(x))
