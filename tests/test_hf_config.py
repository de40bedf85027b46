"""Hugging Face config mapping (attention_jax.hf): for every family a small transformers
config built in code (nothing downloaded), mapped layer by layer and checked against the
config's values and against the family's own attention layer and rotary embedding built
from that config (projection sizes and biases, scale, window, soft-cap, sinks, q/k norm;
cos / sin at offset positions, float32 1e-5). transformers 4.x spellings are checked on
plain objects carrying those attributes."""

from types import SimpleNamespace

import chex
import jax.numpy as jnp
import numpy as np
import pytest

from attention_jax import hf, rope
from attention_jax.rope import Rope
from tests.helpers import hf_configs as _configs

tf = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

ATOL_F32 = RTOL_F32 = 1e-5  # cos / sin against transformers' rotary classes (float32)
POSITIONS = [[3, 4, 5, 6, 7, 8], [0, 0, 1, 2, 3, 4]]  # an offset row, a left-padded row


CONFIGS = _configs()


def _hf_cos_sin(family, cfg, rotary_cls, layer_idx, positions):
    """The family's rotary class's (cos, sin) for the layer, [B, T, R] float32."""
    x = torch.zeros(1, dtype=torch.float32)
    pos = torch.tensor(positions)
    if family == "gemma3":
        return rotary_cls(cfg)(x, pos, cfg.layer_types[layer_idx])
    return rotary_cls(cfg)(x, pos)


@pytest.mark.parametrize("family", list(CONFIGS))
def test_every_layer_maps_as_the_family_attention_layer(family):
    cfg, attention_cls, rotary_cls = CONFIGS[family]
    for layer_idx in range(cfg.num_hidden_layers):
        kw = hf.attention_kwargs_from_hf(cfg, layer_idx)
        layer = attention_cls(cfg, layer_idx)
        N, K, H = kw["num_heads"], kw["num_kv_heads"], kw["head_dim"]
        # the config's values
        assert (kw["in_features"], kw["out_features"]) == (cfg.hidden_size, cfg.hidden_size)
        assert (N, K) == (cfg.num_attention_heads, cfg.num_key_value_heads)
        assert H == (getattr(cfg, "head_dim", None) or cfg.hidden_size // N)
        assert kw["dropout_rate"] == cfg.attention_dropout
        assert kw["qk_norm_eps"] == cfg.rms_norm_eps
        # the layer transformers builds from the same config
        if family == "phi3":  # fused q/k/v, no bias
            assert layer.qkv_proj.out_features == (N + 2 * K) * H
            projections = {"q": layer.qkv_proj, "k": layer.qkv_proj, "v": layer.qkv_proj}
        else:
            projections = {"q": layer.q_proj, "k": layer.k_proj, "v": layer.v_proj}
            assert layer.q_proj.out_features == N * H and layer.k_proj.out_features == K * H
            assert layer.q_proj.in_features == kw["in_features"]
        projections["o"] = layer.o_proj
        assert layer.o_proj.in_features == N * H
        assert layer.o_proj.out_features == kw["out_features"]
        for p, linear in projections.items():
            assert kw[f"{p}_bias"] == (linear.bias is not None), (family, p)
        assert layer.scaling == pytest.approx(kw["scale"] or H ** -0.5, rel=1e-15)
        assert kw["softcap"] == getattr(layer, "attn_logit_softcapping", None)
        # Mistral and Phi3 read the window from the config in forward, on every layer
        window = (layer.sliding_window if hasattr(layer, "sliding_window")
                  else cfg.sliding_window if family in ("mistral", "phi3") else None)
        assert kw["sliding_window"] == window, (family, layer_idx)
        assert kw["sinks"] == hasattr(layer, "sinks")
        if kw["sinks"]:
            assert tuple(layer.sinks.shape) == (N,)
        if kw["qk_norm"] is None:
            assert not hasattr(layer, "q_norm")
        else:
            width = {"head": (H, H), "full": (N * H, K * H)}[kw["qk_norm"]]
            assert (layer.q_norm.weight.shape[0], layer.k_norm.weight.shape[0]) == width
            eps = getattr(layer.q_norm, "variance_epsilon", getattr(layer.q_norm, "eps", None))
            assert kw["qk_norm_eps"] == eps
        # the rotary embedding: our cos / sin equal the family's rotary class's
        r = kw["rope"]
        assert isinstance(r, Rope)
        want_cos, want_sin = _hf_cos_sin(family, cfg, rotary_cls, layer_idx, POSITIONS)
        cos, sin = rope.rope_cos_sin(jnp.array(POSITIONS), H, r)
        if family == "gpt_oss":  # its rotary class returns the R/2 angles once
            cos, sin = cos[..., : r.dim(H) // 2], sin[..., : r.dim(H) // 2]
        chex.assert_trees_all_close((cos, sin), (want_cos.numpy(), want_sin.numpy()),
                                    atol=ATOL_F32, rtol=RTOL_F32)


def test_family_specific_values():
    get = hf.attention_kwargs_from_hf
    c = {f: v[0] for f, v in CONFIGS.items()}
    assert [get(c["qwen2"], i)["sliding_window"] for i in range(4)] == [None, None, 5, 5]
    assert [get(c["gemma2"], i)["sliding_window"] for i in range(4)] == [4, None, 4, None]
    assert [get(c["gemma3"], i)["sliding_window"] for i in range(6)] == [4] * 5 + [None]
    assert [get(c["gpt_oss"], i)["sliding_window"] for i in range(4)] == [4, None, 4, None]
    assert [get(c["mistral"], i)["sliding_window"] for i in range(4)] == [5] * 4
    assert get(c["qwen2"])[("q_bias")] and not get(c["qwen2"])["o_bias"]
    assert get(c["gemma2"])["scale"] == 16 ** -0.5 and get(c["gemma2"])["softcap"] == 30.0
    assert get(c["gemma3"])["scale"] == 24 ** -0.5 and get(c["gemma3"])["softcap"] is None
    assert (get(c["qwen3"])["qk_norm"], get(c["olmo2"])["qk_norm"]) == ("head", "full")
    assert get(c["gpt_oss"])["sinks"] and all(get(c["gpt_oss"])[f"{p}_bias"] for p in "qkvo")
    # Gemma3: local layers rope at 1e4, global ones at 1e6 with linear scaling
    assert get(c["gemma3"], 0)["rope"] == Rope(1e4)
    assert get(c["gemma3"], 5)["rope"] == Rope(1e6, "linear", factor=8.0)
    assert get(c["llama"])["rope"] == Rope(500_000.0, "llama3", factor=8.0,
                                           original_max_position=16)
    assert get(c["qwen2"])["rope"] == Rope(1e6, "yarn", factor=4.0, original_max_position=16)
    assert get(c["qwen3"])["rope"] == Rope(1e6, "dynamic", factor=2.0, original_max_position=64)
    assert get(c["phi3"])["rope"] == Rope(1e4, "longrope", factor=4.0, original_max_position=16,
                                          short_factor=(1.0, 1.5), long_factor=(2.0, 4.0),
                                          rotary_dim=4)
    assert get(c["gpt_oss"])["rope"] == Rope(500.0, "yarn", factor=4.0,
                                             original_max_position=64, truncate=False)
    # the multimodal Gemma3 config maps through its text part
    g3 = tf.Gemma3Config(text_config=c["gemma3"].to_dict())
    assert hf.attention_kwargs_from_hf(g3, 5) == get(c["gemma3"], 5)


def test_rope_of_partial_and_interleaved_families():
    neox = tf.GPTNeoXConfig(hidden_size=32, num_attention_heads=2, num_hidden_layers=1,
                            rope_parameters={"rope_type": "default", "rope_theta": 1e4,
                                             "partial_rotary_factor": 0.25})
    assert hf.rope_from_hf(neox) == Rope(1e4, rotary_dim=4)
    gptj = tf.GPTJConfig(n_embd=32, n_head=2, n_layer=1, rotary_dim=8)
    assert hf.rope_from_hf(gptj) == Rope(1e4, rotary_dim=8, layout="interleaved")


def _legacy(**kw):
    """A transformers 4.x-style config: rope_theta / rope_scaling, no rope_parameters."""
    base = {"model_type": "llama", "hidden_size": 32, "num_attention_heads": 4,
            "num_key_value_heads": 2, "num_hidden_layers": 6, "max_position_embeddings": 64,
            "rms_norm_eps": 1e-6, "attention_dropout": 0.0, "rope_theta": 1e4,
            "rope_scaling": None}
    return SimpleNamespace(**{**base, **kw})


def test_transformers_4_spellings():
    llama = _legacy(rope_theta=5e5, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16})
    assert hf.rope_from_hf(llama) == Rope(5e5, "llama3", factor=8.0, original_max_position=16)
    assert hf.rope_from_hf(_legacy(rope_scaling={"type": "linear", "factor": 2.0})) == Rope(
        1e4, "linear", factor=2.0)
    assert hf.rope_from_hf(_legacy()) == Rope(1e4)
    phi = _legacy(model_type="phi", partial_rotary_factor=0.5)
    assert hf.rope_from_hf(phi) == Rope(1e4, rotary_dim=4)
    neox = _legacy(model_type="gpt_neox", rotary_pct=0.25, hidden_size=64)
    assert hf.rope_from_hf(neox) == Rope(1e4, rotary_dim=4)
    phi3 = _legacy(model_type="phi3", original_max_position_embeddings=16, sliding_window=None,
                   rope_scaling={"type": "longrope", "short_factor": [1.0] * 4,
                                 "long_factor": [2.0] * 4})
    assert hf.rope_from_hf(phi3) == Rope(1e4, "longrope", factor=4.0, original_max_position=16,
                                         short_factor=(1.0,) * 4, long_factor=(2.0,) * 4)
    gemma3 = _legacy(model_type="gemma3_text", rope_theta=1e6, rope_local_base_freq=1e4,
                     rope_scaling={"rope_type": "linear", "factor": 8.0},
                     sliding_window_pattern=3, sliding_window=4, query_pre_attn_scalar=8,
                     attn_logit_softcapping=None)
    kws = [hf.attention_kwargs_from_hf(gemma3, i) for i in range(6)]
    assert [k["sliding_window"] for k in kws] == [4, 4, None, 4, 4, None]
    assert [k["rope"] for k in kws[:3]] == [Rope(1e4), Rope(1e4), Rope(1e6, "linear", factor=8.0)]
    gemma2 = _legacy(model_type="gemma2", sliding_window=4, query_pre_attn_scalar=8,
                     attn_logit_softcapping=50.0)
    assert [hf.attention_kwargs_from_hf(gemma2, i)["sliding_window"] for i in range(4)] == [
        4, None, 4, None]
    qwen2 = _legacy(model_type="qwen2", use_sliding_window=True, sliding_window=8,
                    max_window_layers=4)
    assert [hf.attention_kwargs_from_hf(qwen2, i)["sliding_window"] for i in range(6)] == [
        None] * 4 + [8] * 2


@pytest.mark.parametrize(("config", "match"), [
    (_legacy(model_type="bert"), r"model_type 'bert' is not supported"),
    (_legacy(rope_scaling={"rope_type": "proportional", "factor": 1.0}),
     r"rope_parameters\['rope_type'\] = 'proportional' is not supported"),
    (_legacy(rope_parameters={"rope_type": "default", "rope_theta": 1e4,
                              "mrope_section": [1, 1]}),
     r"rope_parameters keys \['mrope_section'\] are not supported with rope_type='default'"),
    (_legacy(rope_parameters={"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0,
                              "beta_fast": 4.0}), r"\['beta_fast'\] are not supported"),
    (_legacy(model_type="gemma3_text", use_bidirectional_attention=True, sliding_window=4,
             query_pre_attn_scalar=8), r"use_bidirectional_attention=True"),
    (_legacy(model_type="qwen3", layer_types=["full_attention", "chunked_attention"]),
     r"layer_types\[1\] = 'chunked_attention' is not supported"),
    (_legacy(model_type="qwen3", layer_types=["sliding_attention"], sliding_window=None),
     r"layer 0 is a sliding_attention layer but sliding_window is None"),
    (_legacy(model_type="gemma3_text", sliding_window=4, query_pre_attn_scalar=8,
             layer_types=["sliding_attention"],
             rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1e6}}),
     r"rope_parameters has no entry for layer type 'sliding_attention'"),
])
def test_unsupported_settings_are_errors_naming_the_field(config, match):
    with pytest.raises(ValueError, match=match):
        hf.attention_kwargs_from_hf(config, 0 if match.startswith("model") else
                                    (1 if "chunked" in match else 0))


def test_layer_index_out_of_range():
    with pytest.raises(ValueError, match=r"layer_idx must be in \[0, 4\) \(num_hidden_layers\)"):
        hf.attention_kwargs_from_hf(CONFIGS["llama"][0], 4)


def test_a_layer_without_rope():
    cfg = _legacy(model_type="gemma3_text", sliding_window=4, query_pre_attn_scalar=8,
                  layer_types=["full_attention"],
                  rope_parameters={"full_attention": None, "sliding_attention": {
                      "rope_type": "default", "rope_theta": 1e4}})
    assert hf.rope_from_hf(cfg) is None
    np.testing.assert_equal(hf.attention_kwargs_from_hf(cfg)["rope"], None)


# --------------------------------------------------------------------------- end to end
# Our module built from the mapping, with transformers' own weights, against the family's
# attention layer forward (eager, causal, rotary from the family's class) at positions with
# an offset past the original length (row 1: longrope switches) and with a gap (row 2).

E2E = ("llama", "qwen2", "phi3")
E2E_POSITIONS = [[20, 21, 22, 23, 24, 25], [0, 1, 2, 9, 10, 11]]
LATER = ("qk_norm", "qk_norm_eps", "softcap", "sliding_window", "sinks")  # not used here


@pytest.mark.parametrize("family", E2E)
def test_module_from_mapping_matches_the_family_attention_forward(family):
    import jax
    from flax import nnx

    import attention_jax as aj
    from attention_jax import interop

    cfg, attention_cls, rotary_cls = CONFIGS[family]
    cfg._attn_implementation = "eager"
    kw = hf.attention_kwargs_from_hf(cfg, 0)
    assert kw["qk_norm"] is None and kw["softcap"] is None and not kw["sinks"]
    kw = {k: v for k, v in kw.items() if k not in LATER}
    torch.manual_seed(0)
    layer = attention_cls(cfg, 0).eval()
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0.0, 0.3)
    module = aj.MultiHeadAttention(**kw, rngs=nnx.Rngs(0))
    N, K, H = kw["num_heads"], kw["num_kv_heads"], kw["head_dim"]

    def pair(linear, rows=slice(None)):
        bias = None if linear.bias is None else linear.bias[rows].detach()
        return linear.weight[rows].detach(), bias

    if family == "phi3":  # fused [q; k; v] rows
        qkv = layer.qkv_proj
        projections = (pair(qkv, slice(0, N * H)), pair(qkv, slice(N * H, (N + K) * H)),
                       pair(qkv, slice((N + K) * H, None)))
    else:
        projections = (pair(layer.q_proj), pair(layer.k_proj), pair(layer.v_proj))
    interop.load_linear_weights(module, *projections, pair(layer.o_proj))

    x = jax.random.normal(jax.random.key(12), (2, 6, cfg.hidden_size))
    positions = jnp.array(E2E_POSITIONS)
    tx = torch.tensor(np.asarray(x))
    causal = torch.full((6, 6), float("-inf")).triu(1)[None, None]
    with torch.no_grad():
        cos_sin = rotary_cls(cfg)(tx, torch.tensor(E2E_POSITIONS))
        want, _ = layer(tx, position_embeddings=cos_sin, attention_mask=causal)
    got = module(x, is_causal=True, positions=positions, deterministic=True)
    chex.assert_trees_all_close(got, want.numpy(), atol=ATOL_F32, rtol=RTOL_F32)
    # the positions matter: at arange(T) the outputs differ
    plain = module(x, is_causal=True, deterministic=True)
    assert np.abs(np.asarray(plain) - want.numpy()).max() > 1e-3
