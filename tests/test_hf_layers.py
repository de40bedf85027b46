"""Hugging Face attention layers in and out (attention_jax.hf_layers, re-exported by
attention_jax.interop): for every family of tests/helpers.hf_configs (small configs built in
code, nothing downloaded) and every layer of it, our module from ``from_hf`` equals the
family's own transformers attention layer forward (eager, its rotary class, the causal mask
transformers' masking_utils builds for that layer: sliding windows included, left-padded
rows), float32, and so does ``module.decode`` on left-padded rows (prefill, then one-token
steps); each family feature is shown to matter (turning it off moves the output);
``to_hf(from_hf(layer))`` writes the same tensors back; unsupported settings are errors
naming the field."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import attention_jax as aj
from attention_jax import hf, hf_layers, interop, layer, masks
from tests.helpers import hf_configs, jitted

tf = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

ATOL_F32 = RTOL_F32 = 1e-5  # forward vs transformers' eager attention (float32)
MATTERS = 1e-3  # a family feature turned off moves some output by more than this
CONFIGS = hf_configs()
T = 9  # > every window of the configs (3..6), so windows cut keys
ERRORS: dict[str, float] = {}  # family -> max abs error over its layers (printed at the end)


def _layer(family, layer_idx, seed=0):
    """The family's attention layer with random weights (norm scales near 1; Gemma3's stored
    weight w near 0 as it multiplies by 1 + w), eval mode."""
    cfg, attention_cls, _ = CONFIGS[family]
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed + layer_idx)
    hf_layer = attention_cls(cfg, layer_idx).eval()
    with torch.no_grad():
        for name, p in hf_layer.named_parameters():
            p.normal_(0.0, 0.3)
            if "norm" in name and family != "gemma3":
                p.add_(1.0)
    return cfg, hf_layer


def _hf_mask(family, cfg, layer_idx, x, attention_mask):
    """The 4-D mask the family's decoder model gives this layer (transformers' own code)."""
    from transformers import masking_utils

    if family in ("mistral", "phi3"):  # one mask for all layers, windowed when configured
        sliding = cfg.sliding_window is not None
    elif family in ("llama", "olmo2"):
        sliding = False
    else:
        sliding = cfg.layer_types[layer_idx] == "sliding_attention"
    fn = (masking_utils.create_sliding_window_causal_mask if sliding
          else masking_utils.create_causal_mask)
    return fn(config=cfg, inputs_embeds=x, attention_mask=attention_mask, cache=None,
              allow_is_causal_skip=False)


def _inputs(cfg, seed=0):
    """``x [3, T, D]``, the 0/1 attention mask and transformers' position ids: row 0 at an
    offset of 20, rows 1 and 2 left-padded by 3 and 6 (positions ``cumsum(mask) - 1``,
    padding at 1, as ``generate`` makes them)."""
    torch.manual_seed(100 + seed)
    x = torch.randn(3, T, cfg.hidden_size)
    attention_mask = torch.ones(3, T, dtype=torch.long)
    attention_mask[1, :3] = 0
    attention_mask[2, :6] = 0
    positions = (attention_mask.cumsum(-1) - 1).masked_fill(attention_mask == 0, 1)
    positions[0] += 20
    return x, attention_mask, positions


def _hf_forward(family, cfg, hf_layer, layer_idx, x, attention_mask, positions):
    rotary = CONFIGS[family][2](cfg)
    with torch.no_grad():
        if family == "gemma3":
            cos_sin = rotary(x, positions, cfg.layer_types[layer_idx])
        else:
            cos_sin = rotary(x, positions)
        mask = _hf_mask(family, cfg, layer_idx, x, attention_mask)
        out, _ = hf_layer(x, position_embeddings=cos_sin, attention_mask=mask)
    return out.numpy()


def _ours(config, params, x, attention_mask, positions):
    """Our layer on left-padded rows: padding keys hidden by ``Segments`` (id -1)."""
    ids = jnp.asarray(np.where(attention_mask.numpy() == 1, 0, -1))
    return np.asarray(layer.attention_layer(
        config, params, jnp.asarray(x.numpy()), mask=masks.Segments(ids), is_causal=True,
        positions=jnp.asarray(positions.numpy())))


def _features_off(config):
    """``name -> (config without it, parameters it drops)`` for the family features set."""
    off = {}
    if config.softcap is not None:
        off["softcap"] = (config.replace(softcap=None), ())
    if config.sliding_window is not None:
        off["sliding_window"] = (config.replace(sliding_window=None), ())
    if config.sinks:
        off["sinks"] = (config.replace(sinks=False), ("sinks",))
    if config.qk_norm is not None:
        off["qk_norm"] = (config.replace(qk_norm=None), ("q_norm", "k_norm"))
    return off


@pytest.mark.parametrize("family", list(CONFIGS))
def test_from_hf_equals_the_family_attention_forward(family):
    cfg = CONFIGS[family][0]
    worst, seen = 0.0, set()
    for layer_idx in range(cfg.num_hidden_layers):
        cfg, hf_layer = _layer(family, layer_idx)
        module = interop.from_hf(hf_layer, cfg)
        x, attention_mask, positions = _inputs(cfg, layer_idx)
        want = _hf_forward(family, cfg, hf_layer, layer_idx, x, attention_mask, positions)
        valid = attention_mask.numpy() == 1  # padded query rows are garbage on both sides
        got = np.asarray(jitted(module)(
            jnp.asarray(x.numpy()), is_causal=True,  # eval: no dropout
            mask=masks.Segments(jnp.asarray(np.where(valid, 0, -1))),
            positions=jnp.asarray(positions.numpy())))
        np.testing.assert_allclose(got[valid], want[valid], atol=ATOL_F32, rtol=RTOL_F32,
                                   err_msg=f"{family} layer {layer_idx}")
        worst = max(worst, float(np.abs(got[valid] - want[valid]).max()))
        # every family feature of this layer matters: without it the output moves
        params = {k: v for k, v in module.param_values().items() if v is not None}
        for name, (config, dropped) in _features_off(module.config).items():
            kept = {k: v for k, v in params.items() if k not in dropped}
            moved = np.abs(_ours(config, kept, x, attention_mask, positions) - got)[valid]
            assert moved.max() > MATTERS, (family, layer_idx, name, moved.max())
            seen.add(name)
    expected = {"gemma2": {"softcap", "sliding_window"}, "gemma3": {"qk_norm", "sliding_window"},
                "gpt_oss": {"sinks", "sliding_window"}, "qwen3": {"qk_norm", "sliding_window"},
                "olmo2": {"qk_norm"}, "mistral": {"sliding_window"},
                "qwen2": {"sliding_window"}, "phi3": {"sliding_window"}}.get(family, set())
    assert seen == expected
    ERRORS[family] = worst
    print(f"\n{family}: max abs error vs transformers {worst:.2e}; features {sorted(seen)}")


@pytest.mark.parametrize("family", list(CONFIGS))
def test_module_decode_continues_the_family_attention(family):
    """module.decode on left-padded rows (cache.left_padded): a prefill of T - 2 tokens, then
    two one-token steps, equals the transformers layer on all T tokens at its positions."""
    from attention_jax import cache as kv_cache

    cfg = CONFIGS[family][0]
    layer_idx = next((i for i in range(cfg.num_hidden_layers)  # a windowed layer if any
                      if hf.attention_kwargs_from_hf(cfg, i)["sliding_window"]), 0)
    cfg, hf_layer = _layer(family, layer_idx)
    module = interop.from_hf(hf_layer, cfg)
    x, attention_mask, positions = _inputs(cfg, 7)
    positions[0] -= 20  # decode positions count from each row's first token
    want = _hf_forward(family, cfg, hf_layer, layer_idx, x, attention_mask, positions)
    pad = jnp.asarray((attention_mask == 0).sum(1).numpy(), jnp.int32)
    cache = kv_cache.left_padded(module.init_cache(3, T), pad)
    xs = jnp.asarray(x.numpy())
    outs, decode = [], jitted(module, "decode")
    for lo, hi in ((0, T - 2), (T - 2, T - 1), (T - 1, T)):
        y, cache = decode(xs[:, lo:hi], cache)
        outs.append(np.asarray(y))
    got, valid = np.concatenate(outs, axis=1), attention_mask.numpy() == 1
    np.testing.assert_allclose(got[valid], want[valid], atol=ATOL_F32, rtol=RTOL_F32,
                               err_msg=f"{family} layer {layer_idx}")


def test_dropout_follows_the_layer_mode():
    cfg, hf_layer = _layer("llama", 0)  # attention_dropout=0.1
    assert interop.from_hf(hf_layer, cfg).deterministic is True
    module = interop.from_hf(hf_layer.train(), cfg)
    assert module.config.dropout_rate == 0.1 and module.deterministic is False


def test_olmo2_normalises_the_full_projection():
    cfg, hf_layer = _layer("olmo2", 0)
    module = interop.from_hf(hf_layer, cfg)
    N, K = cfg.num_attention_heads, cfg.num_key_value_heads
    H = cfg.hidden_size // N
    assert module.config.qk_norm == "full"
    assert module.q_norm.shape == (N, H) and module.k_norm.shape == (K, H)


def _state(hf_layer):
    return {k: v.detach().clone() for k, v in hf_layer.state_dict().items()}


@pytest.mark.parametrize("family", list(CONFIGS))
def test_to_hf_writes_the_weights_back(family):
    cfg, hf_layer = _layer(family, 0)
    before = _state(hf_layer)
    module = interop.from_hf(hf_layer, cfg)
    with torch.no_grad():  # to_hf must write every tensor, not find them in place
        for p in hf_layer.parameters():
            p.fill_(7.0)
    assert interop.to_hf(module, hf_layer) is hf_layer
    after = _state(hf_layer)
    assert sorted(after) == sorted(before)
    for name, want in before.items():
        assert torch.equal(after[name], want), (family, name)  # Gemma 3's norms included
    # and back again: the module is rebuilt bit for bit
    again = interop.from_hf(hf_layer, cfg)
    for name, value in module.param_values().items():
        if value is not None:
            np.testing.assert_array_equal(np.asarray(again.param_values()[name]),
                                          np.asarray(value), err_msg=name)


def test_interop_reexports():
    assert interop.from_hf is hf_layers.from_hf and interop.to_hf is hf_layers.to_hf


# --------------------------------------------------------------------------- errors


def test_unsupported_layer_class():
    with pytest.raises(ValueError, match=r"layer of type Linear is not supported"):
        interop.from_hf(torch.nn.Linear(2, 2), CONFIGS["llama"][0])


def test_config_of_another_family():
    _, hf_layer = _layer("llama", 0)
    with pytest.raises(ValueError, match=r"config.model_type is 'mistral' but the layer is a "
                                         r"LlamaAttention"):
        interop.from_hf(hf_layer, CONFIGS["mistral"][0])


@pytest.mark.parametrize(("family", "attr", "value", "match"), [
    ("llama", "scaling", 0.5, r"layer.scaling = 0.5 differs from the config's scale"),
    ("llama", "is_causal", False, r"layer.is_causal = False"),
    ("qwen2", "sliding_window", 7, r"layer.sliding_window = 7 but the config maps this layer "
                                   r"to sliding_window=None"),
    ("gemma2", "attn_logit_softcapping", 5.0, r"layer.attn_logit_softcapping = 5.0"),
    ("llama", "head_dim", 4, r"layer.head_dim = 4 but the config maps head_dim=8"),
])
def test_layer_settings_that_differ_from_the_config(family, attr, value, match):
    cfg, hf_layer = _layer(family, 0)
    setattr(hf_layer, attr, value)
    with pytest.raises(ValueError, match=match):
        interop.from_hf(hf_layer, cfg)


def test_qk_norm_eps_that_differs():
    cfg, hf_layer = _layer("qwen3", 0)
    hf_layer.q_norm.variance_epsilon = 1e-3
    with pytest.raises(ValueError, match=r"layer.q_norm eps = 0.001 but the config maps "
                                         r"qk_norm_eps=1e-05"):
        interop.from_hf(hf_layer, cfg)


def test_unsupported_config_field_is_named():
    cfg, hf_layer = _layer("gemma3", 0)
    bidirectional = tf.Gemma3TextConfig(**{**cfg.to_dict(), "use_bidirectional_attention": True})
    with pytest.raises(ValueError, match=r"use_bidirectional_attention=True"):
        interop.from_hf(hf_layer, bidirectional)
    chunked = tf.Qwen3Config(**{**CONFIGS["qwen3"][0].to_dict(),
                                "layer_types": ["chunked_attention"] * 4})
    with pytest.raises(ValueError, match=r"layer_types\[0\] = 'chunked_attention'"):
        interop.from_hf(_layer("qwen3", 0)[1], chunked)


def test_to_hf_refuses_what_does_not_fit():
    cfg, hf_layer = _layer("qwen2", 0)  # q, k, v biases, no o bias
    kw = {k: v for k, v in interop.from_hf(hf_layer, cfg).config.to_dict().items()}
    no_bias = aj.MultiHeadAttention(**{**kw, "q_bias": False}, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"q_proj has bias but the module has none"):
        interop.to_hf(no_bias, hf_layer)
    wider = aj.MultiHeadAttention(**{**kw, "head_dim": 16}, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"q_proj.weight"):
        interop.to_hf(wider, hf_layer)
    _, gemma3_layer = _layer("gemma3", 0)
    mistral = interop.from_hf(_layer("mistral", 0)[1], CONFIGS["mistral"][0])  # no norms
    with pytest.raises(ValueError, match=r"q_norm: the layer has one and the module none"):
        interop.to_hf(mistral, gemma3_layer)
    with pytest.raises(ValueError, match=r"layer of type Linear is not supported"):
        interop.to_hf(no_bias, torch.nn.Linear(2, 2))
