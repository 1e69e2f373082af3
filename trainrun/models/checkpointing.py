"""Activation checkpointing per block (trainer.activation_checkpointing), and a measured activation-memory estimate.

Each block gets torch's composable `checkpoint` (torch.distributed._composable): pre/post-forward hooks that run
the block under non-reentrant torch.utils.checkpoint, so the block keeps only its inputs in forward and recomputes
the rest in backward. Hooks, not a wrapper module: the module tree and the state_dict keys do not change (a run
resumes from a checkpoint taken with or without it); it is the API FSDP2's fully_shard is made to compose with
(apply it before sharding; not exercised by the tests yet). The RNG state is saved and restored around the
recomputation, so dropout and stochastic depth draw the same masks twice.
"""
from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import Dict, List, Tuple

import torch
import torch.nn as nn

from trainrun.errors import ConfigError


def block_types() -> Tuple[type, ...]:
    """The module classes checkpointed as one unit: the GPT's, the ViT's and the ResNets' blocks, and the decoder
    layers of transformers models (transformers.modeling_layers.GradientCheckpointingLayer) when installed."""
    from torchvision.models.resnet import BasicBlock, Bottleneck
    from torchvision.models.vision_transformer import EncoderBlock

    from trainrun.models.gpt import Block

    types: List[type] = [Block, EncoderBlock, BasicBlock, Bottleneck]
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
        types.append(GradientCheckpointingLayer)
    except ImportError:
        pass
    return tuple(types)


def find_blocks(model: nn.Module) -> List[nn.Module]:
    """The outermost known blocks of the model, in module order (a block inside a block is not counted twice)."""
    types = block_types()
    found: List[nn.Module] = []
    inside: set = set()
    for name, module in model.named_modules():
        if any(name.startswith(prefix + ".") for prefix in inside):
            continue
        if isinstance(module, types):
            found.append(module)
            inside.add(name)
    return found


def apply_activation_checkpointing(model: nn.Module) -> int:
    """Checkpoint every block of the model; returns how many. ConfigError if it has none."""
    from torch.distributed._composable import checkpoint

    blocks = find_blocks(model)
    if not blocks:
        raise ConfigError(f"trainer.activation_checkpointing=true: {type(model).__name__} has no block trainrun "
                          "knows how to checkpoint (model=gpt, hf_causal_lm, vit, resnet18/50, torchvision "
                          "resnets); set trainer.activation_checkpointing=false")
    for block in blocks:
        if not is_checkpointed(block):
            checkpoint(block, context_fn=_recompute_contexts)
            block.register_forward_pre_hook(_note_starting_block, prepend=True)  # runs before checkpoint's hook
    return len(blocks)


# The block whose checkpointed forward is starting: the context_fn reads it. Looked up per call, not bound when
# wrapping, so a deepcopy of the model (EMA, SWA) restores its own statistics, not the original's.
_starting: List[nn.Module] = []


def _note_starting_block(module: nn.Module, args) -> None:
    _starting[:] = [module]


def _recompute_contexts():
    """(context of the forward, context of the recomputation in backward) for the block starting now."""
    return nullcontext(), _statistics_kept(_starting.pop())


def is_checkpointed(module: nn.Module) -> bool:
    from torch.distributed._composable import checkpoint

    state = checkpoint.state(module)
    return state is not None and getattr(state, "enable_hook", False)


@contextmanager
def _statistics_kept(block: nn.Module):
    """The recomputation in backward runs the block's forward a second time, which would move BatchNorm's running
    statistics (and its batch counter) twice per step; put back what the recomputation changed."""
    norms = [m for m in block.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training
             and m.track_running_stats]
    saved = [[b.clone() for b in (m.running_mean, m.running_var, m.num_batches_tracked) if b is not None]
             for m in norms]
    try:
        yield
    finally:
        with torch.no_grad():
            for m, buffers in zip(norms, saved):
                live = [b for b in (m.running_mean, m.running_var, m.num_batches_tracked) if b is not None]
                for b, value in zip(live, buffers):
                    b.copy_(value)


@contextmanager
def checkpointing_paused(model: nn.Module):
    """Run the model's checkpointed blocks as plain modules inside the context (a measurement: their own
    saved-tensor hooks would hide what the blocks save; a benchmark: the same model with and without)."""
    from torch.distributed._composable import checkpoint

    paused = [b for b in find_blocks(model) if is_checkpointed(b)]
    for b in paused:
        checkpoint.state(b).enable_hook = False
    try:
        yield
    finally:
        for b in paused:
            checkpoint.state(b).enable_hook = True


def saved_activation_bytes(model: nn.Module, example: torch.Tensor) -> Dict[str, int]:
    """Measure, over one training-mode forward of `example`, the bytes autograd saves for backward (each storage
    once, parameters and buffers excluded): `total`; per block the bytes saved inside it (`blocks`, a list) and its
    input's bytes (`inputs`, a list). No side effects: the RNG and the model's buffers are put back."""
    blocks = find_blocks(model)
    own = {p.untyped_storage().data_ptr() for p in model.parameters()}
    own |= {b.untyped_storage().data_ptr() for b in model.buffers()}
    seen: set = set()
    state = {"block": None, "total": 0}
    inside = [0] * len(blocks)
    inputs = [0] * len(blocks)

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key not in own and key not in seen and storage.nbytes() > 0:
            seen.add(key)
            state["total"] += storage.nbytes()
            if state["block"] is not None:
                inside[state["block"]] += storage.nbytes()
        return t

    def enter(i):
        def hook(module, args):
            state["block"] = i
            inputs[i] = sum(a.untyped_storage().nbytes() for a in args if isinstance(a, torch.Tensor))
        return hook

    handles = [b.register_forward_pre_hook(enter(i)) for i, b in enumerate(blocks)]
    handles += [b.register_forward_hook(lambda *_: state.update(block=None)) for b in blocks]
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    try:
        with torch.random.fork_rng(devices=[]), checkpointing_paused(model), \
                torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.enable_grad():
            model(example)
    finally:
        for h in handles:
            h.remove()
        with torch.no_grad():
            for b, value in buffers:
                b.copy_(value)
    return {"total": state["total"], "blocks": inside, "inputs": inputs}


def activation_bytes_estimate(model: nn.Module, input_shape, batch_size: int, checkpointed: bool) -> int:
    """Peak bytes of activations a training step keeps for backward at `batch_size`, measured on one sample and
    scaled by the batch. Without checkpointing: everything the forward saves. With it: what is saved outside the
    blocks, plus each block's input, plus one block's own activations (recomputed in backward, one at a time)."""
    dtype = getattr(model, "input_dtype", torch.float32)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    example = torch.zeros(1, *input_shape, dtype=dtype, device=device)
    measured = saved_activation_bytes(model, example)
    per_sample = measured["total"]
    if checkpointed and measured["blocks"]:
        per_sample = (measured["total"] - sum(measured["blocks"]) + sum(measured["inputs"])
                      + max(measured["blocks"]))
    return int(per_sample * batch_size)
