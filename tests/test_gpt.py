"""model=gpt (decoder-only transformer) and model=hf_causal_lm: the GPT against Hugging Face's GPT-2 carrying the
same weights, RoPE against transformers' Llama rotary code, causality, tied weights through state_dict / init /
optimizer groups, init=gpt2 on the marked residual projections, and the one-line refusals."""
import io
import math

import pytest
import torch
import torch.nn as nn
from omegaconf import OmegaConf

from trainrun.config import ModelConfig, OptimizerConfig
from trainrun.errors import ConfigError, DataError
from trainrun.init import apply_init
from trainrun.models import build_model, check, check_model_size
from trainrun.models.gpt import GPT, apply_rotary, rotary_angles
from trainrun.optim import param_groups

VOCAB, BLOCK = 61, 16


def model_cfg(**keys):
    cfg = OmegaConf.structured(ModelConfig)
    cfg.merge_with({"name": "gpt", "width": 32, "layers": 2, "heads": 4, "mlp_ratio": 4.0, **keys})
    return cfg


def build(seed=0, dropout=0.0, **keys):
    torch.manual_seed(seed)
    cfg = model_cfg(**keys)
    check(cfg)
    return build_model(cfg, (BLOCK,), VOCAB, dropout)


def tokens(n=2, t=BLOCK, seed=1):
    return torch.randint(0, VOCAB, (n, t), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("keys", [{}, {"positions": "rotary", "norm": "rmsnorm"}, {"bias": False},
                                  {"tie_weights": False}])
def test_forward_shapes_any_length_up_to_the_block(keys):
    model = build(**keys)
    assert model(tokens()).shape == (2, BLOCK, VOCAB)
    assert model(tokens(1, 1)).shape == (1, 1, VOCAB)  # what generation calls
    assert model(tokens(1, 5)).dtype == torch.float32
    with pytest.raises(DataError, match="longer than the GPT's context of 16"):
        model(tokens(1, BLOCK + 1))


@pytest.mark.parametrize("positions", ["learned", "rotary"])
def test_causal_a_later_token_never_changes_earlier_logits(positions):
    model = build(positions=positions).eval()
    x = tokens(1)
    y = x.clone()
    y[0, 9] = (y[0, 9] + 1) % VOCAB
    a, b = model(x), model(y)
    assert torch.equal(a[:, :9], b[:, :9])
    assert not torch.allclose(a[:, 9:], b[:, 9:])
    # the prefix alone gives the same logits as inside the longer sequence
    torch.testing.assert_close(model(x[:, :9]), a[:, :9], rtol=1e-5, atol=1e-5)


def test_matches_huggingface_gpt2_with_the_same_weights():
    """Learned positions, LayerNorm with bias, exact GELU, tied head: the architecture of GPT-2, so transformers'
    GPT2LMHeadModel carrying our weights must give the same logits."""
    transformers = pytest.importorskip("transformers")
    model = build(dropout=0.0).eval()
    config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=BLOCK, n_embd=32, n_layer=2, n_head=4,
                                     n_inner=128, activation_function="gelu", resid_pdrop=0.0, embd_pdrop=0.0,
                                     attn_pdrop=0.0, layer_norm_epsilon=1e-5, tie_word_embeddings=True)
    reference = transformers.GPT2LMHeadModel(config).eval()
    ours = model.state_dict()
    state = {"transformer.wte.weight": ours["token_embedding.weight"],
             "transformer.wpe.weight": ours["position_embedding.weight"],
             "transformer.ln_f.weight": ours["norm.weight"], "transformer.ln_f.bias": ours["norm.bias"],
             "lm_head.weight": ours["head.weight"]}
    names = {"norm1": "ln_1", "attn.qkv": "attn.c_attn", "attn.proj": "attn.c_proj", "norm2": "ln_2",
             "mlp.fc": "mlp.c_fc", "mlp.proj": "mlp.c_proj"}
    for i in range(2):
        for ours_name, theirs in names.items():
            for kind in ("weight", "bias"):
                value = ours[f"blocks.{i}.{ours_name}.{kind}"]
                conv1d = kind == "weight" and not ours_name.startswith("norm")  # HF Conv1D stores [in, out]
                state[f"transformer.h.{i}.{theirs}.{kind}"] = value.t() if conv1d else value
    missing, unexpected = reference.load_state_dict(state, strict=False)
    assert not unexpected and all("attn.bias" in k or "masked_bias" in k for k in missing), missing
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(input_ids=x).logits, rtol=1e-4, atol=1e-5)


def test_rotary_matches_transformers_llama():
    llama = pytest.importorskip("transformers.models.llama.modeling_llama")
    from transformers import LlamaConfig

    head_dim, t = 8, 12
    config = LlamaConfig(hidden_size=32, num_attention_heads=4, max_position_embeddings=64, rope_theta=10000.0)
    rope = llama.LlamaRotaryEmbedding(config)
    q, k = torch.randn(2, 4, t, head_dim), torch.randn(2, 4, t, head_dim)
    cos, sin = rope(q, torch.arange(t)[None])
    q_ref, k_ref = llama.apply_rotary_pos_emb(q, k, cos, sin)
    ours_cos, ours_sin = rotary_angles(t, head_dim)
    torch.testing.assert_close(apply_rotary(q, ours_cos, ours_sin), q_ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(apply_rotary(k, ours_cos, ours_sin), k_ref, rtol=1e-6, atol=1e-6)


def test_rotary_scores_depend_on_relative_position_only():
    head_dim = 8
    cos, sin = rotary_angles(20, head_dim)
    q, k = torch.randn(head_dim, dtype=torch.float64), torch.randn(head_dim, dtype=torch.float64)
    rq = apply_rotary(q.expand(20, head_dim), cos.double(), sin.double())
    rk = apply_rotary(k.expand(20, head_dim), cos.double(), sin.double())
    assert torch.allclose(rq[7] @ rk[3], rq[14] @ rk[10])  # both 4 apart
    assert torch.allclose(rq[0] @ rk[0], q @ k)  # position 0: no rotation


def test_attention_against_a_hand_computation():
    model = build().eval()
    attn = model.blocks[0].attn
    x = torch.randn(2, 5, 32)
    q, k, v = attn.qkv(x).split(32, dim=-1)
    heads = [slice(h * 8, (h + 1) * 8) for h in range(4)]
    mask = torch.ones(5, 5).tril().bool()
    out = []
    for h in heads:
        scores = (q[..., h] @ k[..., h].transpose(1, 2)) / math.sqrt(8)
        out.append(scores.masked_fill(~mask, float("-inf")).softmax(-1) @ v[..., h])
    expected = attn.proj(torch.cat(out, dim=-1))
    torch.testing.assert_close(attn(x), expected, rtol=1e-5, atol=1e-6)


def test_norm_kinds_and_bias():
    rms = build(norm="rmsnorm")
    assert isinstance(rms.norm, nn.RMSNorm) and isinstance(rms.blocks[0].norm1, nn.RMSNorm)
    plain = build(bias=False)
    assert plain.blocks[0].attn.qkv.bias is None and plain.norm.bias is None and plain.head.bias is None
    assert build(positions="rotary").position_embedding is None


def test_tied_weights_survive_state_dict_init_and_optimizer_groups():
    model = build(tie_weights=True)
    assert model.head.weight is model.token_embedding.weight
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    fresh = build(seed=5, tie_weights=True)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    assert fresh.head.weight is fresh.token_embedding.weight
    torch.testing.assert_close(fresh(tokens()), model(tokens()))
    for scheme in ("gpt2", "xavier_uniform", "kaiming_normal"):
        apply_init(model, OmegaConf.create({"name": scheme, "std": 0.02, "zero_init_residual": False,
                                            "zero_init_head": False}), activation="gelu")
        assert model.head.weight is model.token_embedding.weight, scheme
    groups = param_groups(model, OmegaConf.structured(OptimizerConfig))
    params = [p for g in groups for p in g["params"]]
    assert len(params) == len({id(p) for p in params}) == len(list(model.parameters()))
    no_decay = {id(p) for g in groups if not g["decay"] for p in g["params"]}
    assert id(model.token_embedding.weight) in no_decay and id(model.position_embedding.weight) in no_decay
    assert id(model.blocks[0].attn.qkv.weight) not in no_decay


def test_rmsnorm_weights_are_not_decayed():
    model = build(norm="rmsnorm", tie_weights=False)
    groups = param_groups(model, OmegaConf.structured(OptimizerConfig))
    no_decay = {id(p) for g in groups if not g["decay"] for p in g["params"]}
    assert id(model.blocks[1].norm2.weight) in no_decay and id(model.norm.weight) in no_decay
    assert id(model.head.weight) not in no_decay


def test_gpt2_init_scales_the_marked_residual_projections():
    torch.manual_seed(0)
    model = GPT(vocab_size=VOCAB, block_size=BLOCK, width=256, layers=3, heads=4, mlp_ratio=4.0)
    marked = [m for m in model.modules() if getattr(m, "_residual_projection", False)]
    assert marked == [m for b in model.blocks for m in (b.attn.proj, b.mlp.proj)]
    apply_init(model, OmegaConf.create({"name": "gpt2", "std": 0.02, "zero_init_residual": False,
                                        "zero_init_head": False}))
    scaled = torch.cat([m.weight.flatten() for m in marked])
    assert scaled.std().item() == pytest.approx(0.02 / math.sqrt(2 * 3), rel=0.01)
    assert model.blocks[0].attn.qkv.weight.std().item() == pytest.approx(0.02, rel=0.01)
    assert model.token_embedding.weight.std().item() == pytest.approx(0.02, rel=0.02)
    assert torch.equal(model.blocks[0].attn.qkv.bias, torch.zeros(3 * 256))


def test_seeded_builds_and_dropout_are_reproducible():
    a, b = build(seed=3, dropout=0.2), build(seed=3, dropout=0.2)
    torch.manual_seed(7)
    out_a = a(tokens())
    torch.manual_seed(7)
    assert torch.equal(out_a, b(tokens()))
    assert not torch.equal(out_a, b(tokens()))  # dropout draws new masks


def test_builds_on_the_meta_device_for_the_size_check():
    assert check_model_size(model_cfg(), (BLOCK,), VOCAB) == sum(p.numel() for p in build().parameters())


@pytest.mark.parametrize("keys, match", [({"width": 30, "heads": 4}, "divisible by model.heads=4"),
                                         ({"width": 36, "heads": 4, "positions": "rotary"}, "head dim .* is odd"),
                                         ({"norm": "batchnorm"}, "layernorm or rmsnorm"),
                                         ({"positions": "alibi"}, "learned .* or rotary"),
                                         ({"heads": 0}, "heads")])
def test_refusals_in_one_line(keys, match):
    with pytest.raises(ConfigError, match=match) as info:
        check(model_cfg(**keys))
    assert "\n" not in str(info.value)


# --- model=hf_causal_lm ---

HF_TINY = {"gpt2": {"n_embd": 32, "n_layer": 2, "n_head": 2},
           "llama": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 2,
                     "intermediate_size": 64}}


def hf_cfg(arch, **keys):
    cfg = OmegaConf.structured(ModelConfig)
    cfg.merge_with({"name": "hf_causal_lm", "arch": arch, "hf_config": {**HF_TINY.get(arch, {}), **keys}})
    return cfg


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_hf_causal_lm_builds_from_config_and_returns_logits(arch):
    pytest.importorskip("transformers")
    cfg = hf_cfg(arch)
    check(cfg)
    torch.manual_seed(0)
    model = build_model(cfg, (BLOCK,), VOCAB, 0.0)
    config = model.model.config
    assert config.vocab_size == VOCAB
    assert getattr(config, "n_positions", getattr(config, "max_position_embeddings", None)) == BLOCK
    out = model(tokens())
    assert isinstance(out, torch.Tensor) and out.shape == (2, BLOCK, VOCAB)
    assert model(tokens(1, 1)).shape == (1, 1, VOCAB)
    assert check_model_size(cfg, (BLOCK,), VOCAB) == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("arch, names", [("gpt2", ("attn.c_proj", "mlp.c_proj")),
                                         ("llama", ("self_attn.o_proj", "mlp.down_proj"))])
def test_hf_gpt2_init_scales_the_residual_projections(arch, names):
    pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = build_model(hf_cfg(arch, **({"n_embd": 128} if arch == "gpt2" else {"hidden_size": 128,
                                                                                   "intermediate_size": 256})),
                        (BLOCK,), VOCAB, 0.0)
    assert model.num_layers == 2
    marked = [n for n, m in model.named_modules() if getattr(m, "_residual_projection", False)]
    assert len(marked) == 4 and all(n.endswith(names) for n in marked)
    apply_init(model, OmegaConf.create({"name": "gpt2", "std": 0.02, "zero_init_residual": False,
                                        "zero_init_head": False}))
    weights = torch.cat([model.get_submodule(n).weight.flatten() for n in marked])
    assert weights.std().item() == pytest.approx(0.02 / math.sqrt(4), rel=0.02)


@pytest.mark.parametrize("keys, match", [({"arch": "gtp2"}, "not a transformers causal-LM model_type; use one "
                                                           "such as gpt2"),
                                         ({"arch": "bert_classifier"}, "model_type"),
                                         ({"pretrained": True}, "downloads nothing")])
def test_hf_refusals_in_one_line(keys, match):
    pytest.importorskip("transformers")
    cfg = hf_cfg("gpt2")
    cfg.merge_with(keys)
    with pytest.raises(ConfigError, match=match) as info:
        check(cfg)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("keys, match", [({"vocab_size": 5}, "the vocabulary comes from the data"),
                                         ({"n_embdd": 5}, "GPT2Config has no such key")])
def test_hf_config_key_refusals(keys, match):
    pytest.importorskip("transformers")
    with pytest.raises(ConfigError, match=match):
        build_model(hf_cfg("gpt2", **keys), (BLOCK,), VOCAB, 0.0)


def test_hf_missing_transformers_is_refused_with_the_pip_line(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "transformers" else
                        real(name, *a))
    with pytest.raises(ConfigError, match=r"pip install 'trainrun\[hf\]'"):
        check(hf_cfg("gpt2"))


@pytest.mark.parametrize("cfg", [model_cfg(), hf_cfg("gpt2")])
def test_image_shaped_inputs_are_refused(cfg):
    pytest.importorskip("transformers")
    with pytest.raises(ConfigError, match=r"reads token sequences, and the data gives samples of shape \[1, 8, 8\]; "
                                          "use data=text with task=causal_lm"):
        build_model(cfg, (1, 8, 8), 10, 0.0)
