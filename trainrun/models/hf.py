"""model=hf_causal_lm: any Hugging Face transformers causal-LM architecture, built from its config (random
weights, nothing downloaded), wrapped so forward(tokens) returns the logits tensor."""
from __future__ import annotations

import difflib
import importlib.util
from typing import Any, Dict, List

import torch
import torch.nn as nn

from trainrun.errors import ConfigError
from trainrun.models.gpt import context_length

HF_EXTRA = "pip install 'trainrun[hf]'"
# model_type -> (attention output, MLP output) Linear names that write into the residual stream (init=gpt2)
RESIDUAL_PROJECTIONS = {"gpt2": ("attn.c_proj", "mlp.c_proj"), "llama": ("self_attn.o_proj", "mlp.down_proj"),
                        "mistral": ("self_attn.o_proj", "mlp.down_proj"),
                        "qwen2": ("self_attn.o_proj", "mlp.down_proj"), "qwen3": ("self_attn.o_proj", "mlp.down_proj"),
                        "gpt_neox": ("attention.dense", "mlp.dense_4h_to_h")}
POSITION_KEYS = ("n_positions", "max_position_embeddings")  # the context length, as configs name it


def causal_lm_archs() -> List[str]:
    """The model_types transformers can build as a causal LM."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def check(cfg) -> None:
    """The hf_causal_lm rules of the model section, before anything is built."""
    if importlib.util.find_spec("transformers") is None:
        raise ConfigError(f"model=hf_causal_lm: transformers is not installed; {HF_EXTRA}")
    if cfg.get("pretrained"):
        raise ConfigError("model.pretrained=true: model=hf_causal_lm builds an architecture from its config with "
                          "random weights and downloads nothing; use model.weights=PATH for your own weights")
    arch = cfg.get("arch") or ""
    archs = causal_lm_archs()
    if arch not in archs:
        close = difflib.get_close_matches(arch, archs, n=3) or ["gpt2", "llama", "qwen2", "gpt_neox"]
        raise ConfigError(f"model.arch={arch!r}: not a transformers causal-LM model_type; use one such as "
                          f"{', '.join(close)} ({len(archs)} in all: transformers' MODEL_FOR_CAUSAL_LM_MAPPING)")


def hf_config(arch: str, keys: Dict[str, Any], vocab_size: int, block_size: int):
    """transformers' config of `arch` with the user's keys, the vocabulary of the data and, where the config has a
    context-length key the user left unset, the block size. Special-token ids outside the vocabulary (gpt2's 50256
    with a byte vocabulary) are cleared rather than left pointing at no embedding row."""
    from transformers import AutoConfig

    defaults = AutoConfig.for_model(arch)
    keys = dict(keys)
    if "vocab_size" in keys and keys["vocab_size"] != vocab_size:
        raise ConfigError(f"model.hf_config.vocab_size={keys['vocab_size']}: the vocabulary comes from the data "
                          f"({vocab_size} tokens); drop the key")
    keys["vocab_size"] = vocab_size
    for key in POSITION_KEYS:
        if hasattr(defaults, key) and key not in keys:
            keys[key] = block_size
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(defaults, key, None)
        if key not in keys and isinstance(value, int) and value >= vocab_size:
            keys[key] = None
    unknown = [k for k in keys if not hasattr(defaults, k)]
    if unknown:
        raise ConfigError(f"model.hf_config.{unknown[0]}: {type(defaults).__name__} has no such key; see its "
                          "documentation for the keys (e.g. gpt2: n_embd, n_layer, n_head; llama: hidden_size, "
                          "num_hidden_layers, num_attention_heads, intermediate_size)")
    return AutoConfig.for_model(arch, **keys)


class HFCausalLM(nn.Module):
    """forward(tokens int64 [N, T]) -> logits [N, T, vocab] of the wrapped transformers model (no KV cache)."""

    input_dtype = torch.long

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=tokens, use_cache=False).logits


def hf_causal_lm(cfg, input_shape, num_classes: int, dropout: float) -> nn.Module:
    """Any transformers causal LM by model_type (model.arch) and config keys (model.hf_config); vocab from the data,
    context from data.block_size; random weights, nothing downloaded."""
    check(cfg)
    from omegaconf import OmegaConf
    from transformers import AutoModelForCausalLM

    block_size = context_length(input_shape, "model=hf_causal_lm")
    keys = cfg.get("hf_config") or {}
    keys = OmegaConf.to_container(keys, resolve=True) if OmegaConf.is_config(keys) else dict(keys)
    config = hf_config(cfg.arch, keys, num_classes, block_size)
    wrapped = HFCausalLM(AutoModelForCausalLM.from_config(config))
    mark_residual_projections(wrapped, cfg.arch)
    return wrapped


hf_causal_lm.config_keys = ("arch", "hf_config")


def mark_residual_projections(model: nn.Module, arch: str) -> int:
    """Mark the attention-output and MLP-output Linears of each decoder layer for init=gpt2 (architectures in
    RESIDUAL_PROJECTIONS; other ones get init=gpt2's plain N(0, std) everywhere). Returns the layer count."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    names = RESIDUAL_PROJECTIONS.get(arch)
    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    if names is None or not layers:
        return 0
    for layer in layers:
        for name in names:
            layer.get_submodule(name)._residual_projection = True
    model.num_layers = len(layers)
    return len(layers)
