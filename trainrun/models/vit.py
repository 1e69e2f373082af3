"""Vision Transformers from torchvision's VisionTransformer, sized for small images."""
from __future__ import annotations

from typing import List

import torch.nn as nn

from trainrun.errors import ConfigError


def vit(cfg, input_shape, num_classes: int, dropout: float) -> nn.Module:
    """ViT (torchvision VisionTransformer): patch_size, width, layers, heads, mlp_ratio from model.*."""
    from torchvision.models.vision_transformer import VisionTransformer  # deferred: ~1 s of import

    c, h, w = input_shape
    p = cfg.patch_size
    if h != w or h % p:
        raise ConfigError(f"model.patch_size={p}: a ViT needs square inputs divisible by the patch size, "
                          f"got {h}x{w}; change model.patch_size or data.image_size")
    if cfg.width % cfg.heads:
        raise ConfigError(f"model.width={cfg.width} must be divisible by model.heads={cfg.heads}")
    model = VisionTransformer(image_size=h, patch_size=p, num_layers=cfg.layers, num_heads=cfg.heads,
                              hidden_dim=cfg.width, mlp_dim=int(cfg.width * cfg.mlp_ratio), dropout=dropout,
                              num_classes=num_classes)
    if c != 3:
        model.conv_proj = nn.Conv2d(c, cfg.width, kernel_size=p, stride=p)
    mark_residual_projections(model)
    return model


vit.config_keys = ("patch_size", "width", "layers", "heads", "mlp_ratio", "dropout")  # the model.* keys it reads


def mark_residual_projections(model: nn.Module) -> int:
    """Mark the two Linear layers that write into each block's residual stream (attention out_proj, the MLP's
    second Linear) for init=gpt2, and give the model its block count N (their std becomes 0.02 / sqrt(2 N))."""
    from torchvision.models.vision_transformer import EncoderBlock

    blocks = [m for m in model.modules() if isinstance(m, EncoderBlock)]
    for block in blocks:
        block.self_attention.out_proj._residual_projection = True
        [m for m in block.mlp if isinstance(m, nn.Linear)][-1]._residual_projection = True
    model.num_layers = len(blocks)
    return len(blocks)


def drop_path_rates(rate: float, depth: int) -> List[float]:
    """timm's `drop_path_rate` rule: block i of `depth` drops with probability linspace(0, rate, depth)[i], so the
    first block never drops and the last drops with `rate` (timm VisionTransformer's dpr list)."""
    import torch

    return [x.item() for x in torch.linspace(0, rate, depth)]


def add_drop_path(model: nn.Module, rate: float) -> int:
    """Stochastic depth for the ViT blocks (timm's DropPath): each block's attention and MLP branch is zeroed per sample
    with its block's rate, and kept samples are scaled by 1 / (1 - rate). Forward hooks on the branch outputs (the
    attention dropout, the MLP), so the state dict keys do not change; masks draw from the global torch RNG, which
    checkpoints capture, in timm's order (block by block, attention before MLP). Returns the number of blocks."""
    from torchvision.models.vision_transformer import EncoderBlock
    from torchvision.ops import stochastic_depth

    blocks = [m for m in model.modules() if isinstance(m, EncoderBlock)]
    for block, block_rate in zip(blocks, drop_path_rates(rate, len(blocks))):
        if block_rate == 0:
            continue
        for branch in (block.dropout, block.mlp):
            branch.register_forward_hook(
                lambda mod, inp, out, p=block_rate: stochastic_depth(out, p, "row", training=mod.training))
    return len(blocks)
