"""Activation checkpointing (trainrun.models.checkpointing): the same loss, gradients, BatchNorm statistics and RNG
stream with and without it (bitwise on CPU: the recomputation runs the same kernels on the same inputs with the
RNG state put back), unchanged state_dict keys, and the measured activation estimate against a hand count."""
import copy

import pytest
import torch
import torch.nn as nn
from omegaconf import OmegaConf

from trainrun.config import ModelConfig
from trainrun.errors import ConfigError
from trainrun.models import build_model
from trainrun.models.checkpointing import (activation_bytes_estimate, apply_activation_checkpointing, find_blocks,
                                           saved_activation_bytes)
from trainrun.models.vit import add_drop_path


def model_cfg(**keys):
    cfg = OmegaConf.structured(ModelConfig)
    cfg.merge_with(keys)
    return cfg


def gpt(dropout=0.1):
    return build_model(model_cfg(name="gpt", width=32, layers=3, heads=4, positions="rotary"), (16,), 50, dropout)


def vit():
    model = build_model(model_cfg(name="vit", patch_size=4, width=32, layers=3, heads=2, mlp_ratio=2.0),
                        (3, 16, 16), 10, 0.1)
    add_drop_path(model, 0.3)
    return model


def resnet18():
    return build_model(model_cfg(name="resnet18", small_input=True), (3, 16, 16), 10, 0.0)


def hf_llama():
    pytest.importorskip("transformers")
    keys = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 2,
            "intermediate_size": 64, "attention_dropout": 0.1}
    return build_model(model_cfg(name="hf_causal_lm", arch="llama", hf_config=keys), (16,), 50, 0.0)


CASES = {"gpt": (gpt, lambda g: torch.randint(0, 50, (4, 16), generator=g), 3),
         "vit": (vit, lambda g: torch.randn(4, 3, 16, 16, generator=g), 3),
         "resnet18": (resnet18, lambda g: torch.randn(4, 3, 16, 16, generator=g), 8),
         "hf_llama": (hf_llama, lambda g: torch.randint(0, 50, (4, 16), generator=g), 2)}


def two_steps(model, x):
    """Two forward/backward passes in training mode from a fixed seed: the losses, the gradients of the second,
    the buffers (BatchNorm statistics) and the global RNG state afterwards."""
    torch.manual_seed(123)
    model.train()
    losses = []
    for _ in range(2):
        model.zero_grad(set_to_none=True)
        out = model(x)
        loss = out.float().pow(2).mean() + out.float().mean()
        loss.backward()
        losses.append(loss.detach())
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    return losses, grads, buffers, torch.get_rng_state()


@pytest.mark.parametrize("name", sorted(CASES))
def test_same_loss_gradients_statistics_and_rng_with_and_without(name):
    factory, batch, expected_blocks = CASES[name]
    torch.manual_seed(0)
    plain = factory()
    wrapped = copy.deepcopy(plain)
    keys = list(wrapped.state_dict())
    assert apply_activation_checkpointing(wrapped) == expected_blocks
    wrapped = copy.deepcopy(wrapped)  # a copy (EMA, SWA) keeps the checkpointing and restores its own statistics
    assert list(wrapped.state_dict()) == keys  # checkpoints and resume unaffected
    x = batch(torch.Generator().manual_seed(1))
    losses, grads, buffers, rng = two_steps(plain, x)
    losses_ac, grads_ac, buffers_ac, rng_ac = two_steps(wrapped, x)
    assert all(torch.equal(a, b) for a, b in zip(losses, losses_ac))
    assert grads.keys() == grads_ac.keys() and len(grads) == len(list(plain.parameters()))
    for n in grads:
        assert torch.equal(grads[n], grads_ac[n]), n
    for n in buffers:  # BatchNorm statistics move once per step, not again in the recomputation
        assert torch.equal(buffers[n], buffers_ac[n]), n
    assert torch.equal(rng, rng_ac)


def test_checkpointing_does_save_less_and_the_state_dict_loads_across():
    torch.manual_seed(0)
    plain = gpt()
    wrapped = copy.deepcopy(plain)
    apply_activation_checkpointing(wrapped)
    x = torch.randint(0, 50, (2, 16))
    sizes = []
    for model in (plain, wrapped):
        total = [0]

        def pack(t):
            total[0] += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(x)
        sizes.append(total[0])
    assert sizes[1] < sizes[0] / 2
    fresh = gpt()
    fresh.load_state_dict(wrapped.state_dict())
    wrapped.load_state_dict(plain.state_dict())


def test_applying_twice_wraps_once_and_models_without_blocks_are_refused():
    model = gpt()
    assert apply_activation_checkpointing(model) == apply_activation_checkpointing(model) == 3
    torch.manual_seed(0)
    loss = model(torch.zeros(1, 4, dtype=torch.long)).sum()
    loss.backward()
    with pytest.raises(ConfigError, match="has no block trainrun knows how to checkpoint") as info:
        apply_activation_checkpointing(build_model(model_cfg(name="mlp"), (1, 8, 8), 10, 0.0))
    assert "\n" not in str(info.value)


def test_torchvision_zoo_resnets_have_their_blocks_found():
    model = build_model(model_cfg(name="torchvision", arch="resnet50", small_input=False), (3, 32, 32), 10, 0.0)
    assert len(find_blocks(model)) == 16  # Bottleneck: 3 + 4 + 6 + 3


def test_activation_estimate_against_a_hand_count():
    """Linear(4, 8) saves its input (4 floats); ReLU its output (8 floats), which Linear(8, 3) saves again (the
    same storage, counted once); weights are not activations. 12 floats = 48 bytes a sample."""
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    assert activation_bytes_estimate(model, (4,), batch_size=1, checkpointed=False) == 48
    assert activation_bytes_estimate(model, (4,), batch_size=5, checkpointed=False) == 240


def test_activation_estimate_with_checkpointing_and_no_side_effects():
    torch.manual_seed(0)
    model = resnet18()
    before = {n: b.clone() for n, b in model.named_buffers()}
    rng = torch.get_rng_state()
    full = activation_bytes_estimate(model, (3, 16, 16), 8, checkpointed=False)
    light = activation_bytes_estimate(model, (3, 16, 16), 8, checkpointed=True)
    measured = saved_activation_bytes(model, torch.zeros(1, 3, 16, 16))
    assert full == 8 * measured["total"]
    assert light == 8 * (measured["total"] - sum(measured["blocks"]) + sum(measured["inputs"])
                         + max(measured["blocks"]))
    assert 0 < light < 0.7 * full  # ResNet-18 at 16 px: the stem keeps the most outside the blocks
    assert all(torch.equal(b, before[n]) for n, b in model.named_buffers())
    assert torch.equal(torch.get_rng_state(), rng)
    apply_activation_checkpointing(model)  # measured the same once the blocks are checkpointed
    assert activation_bytes_estimate(model, (3, 16, 16), 8, checkpointed=False) == full
    # a GPT takes token ids: the estimate feeds them (input_dtype)
    assert activation_bytes_estimate(gpt(), (16,), 2, checkpointed=True) < activation_bytes_estimate(
        gpt(), (16,), 2, checkpointed=False)
