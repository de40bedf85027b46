"""Hugging Face transformers configs -> this library's attention settings.

:func:`rope_from_hf` reads a config's rotary embedding as a :class:`~attention_jax.rope.Rope`
and :func:`attention_kwargs_from_hf` maps one layer of a config of the families Llama,
Mistral, Qwen2, Qwen3, Gemma2, Gemma3, Phi3, gpt-oss and OLMo2 to the keyword arguments of
:class:`attention_jax.MultiHeadAttention`. Nothing here imports transformers: any object
with the config's attributes works, in both spellings of the rope settings
(transformers >= 5: ``rope_parameters``, possibly nested per layer type; 4.x:
``rope_theta`` and ``rope_scaling``). A setting that would change attention and that is not
mapped (an unknown ``rope_type`` or rope key, a layer type other than full / sliding
attention, Gemma's bidirectional attention) raises ``ValueError`` naming the field.

Sliding windows follow transformers' ``masking_utils.sliding_window_overlay``: with window
W a query at position t sees keys ``t - W < s <= t`` (W keys, itself included), the same
convention as :func:`attention_jax.masks.sliding_window_mask`, so ``sliding_window`` is the
config's value unchanged for every family here.

>>> from types import SimpleNamespace
>>> cfg = SimpleNamespace(model_type="llama", hidden_size=64, num_attention_heads=4,
...                       num_key_value_heads=2, max_position_embeddings=128,
...                       rope_parameters={"rope_type": "default", "rope_theta": 500.0})
>>> kw = attention_kwargs_from_hf(cfg)
>>> kw["num_heads"], kw["num_kv_heads"], kw["head_dim"], kw["rope"].theta
(4, 2, 16, 500.0)
"""

from __future__ import annotations

from typing import Any

from attention_jax.rope import Rope

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3", "gpt_oss",
            "olmo2")
LAYER_TYPES = ("full_attention", "sliding_attention")
_TYPES = {"default": "none", "linear": "linear", "dynamic": "dynamic", "llama3": "llama3",
          "yarn": "yarn", "longrope": "longrope"}
_COMMON_KEYS = {"rope_type", "type", "rope_theta", "partial_rotary_factor"}
_KEYS = {  # the rope keys each type reads (transformers' _validate_*_rope_parameters)
    "default": set(),
    "linear": {"factor"},
    "dynamic": {"factor"},
    "llama3": {"factor", "original_max_position_embeddings", "low_freq_factor",
               "high_freq_factor"},
    "yarn": {"factor", "original_max_position_embeddings", "attention_factor", "beta_fast",
             "beta_slow", "mscale", "mscale_all_dim", "truncate"},
    "longrope": {"factor", "original_max_position_embeddings", "attention_factor",
                 "short_factor", "long_factor"},
}


def _text_config(cfg):
    """The text part of a multimodal config (Gemma3Config -> its text_config)."""
    text = getattr(cfg, "text_config", None)
    return cfg if text is None else text


def _head_dim(cfg) -> int:
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


def layer_type(hf_config, layer_idx: int = 0) -> str:
    """``"full_attention"`` or ``"sliding_attention"`` for layer ``layer_idx``.

    ``layer_types`` when the config has it; otherwise each family's older rule
    (Gemma2 and gpt-oss: even layers slide; Gemma3: all but every
    ``sliding_window_pattern``-th; Qwen2/3: layers ``>= max_window_layers`` when
    ``use_sliding_window``; Mistral and Phi3: every layer slides when ``sliding_window``
    is set; the others: full).
    """
    cfg = _text_config(hf_config)
    n = getattr(cfg, "num_hidden_layers", None)
    if n is not None and not 0 <= layer_idx < n:
        raise ValueError(f"layer_idx must be in [0, {n}) (num_hidden_layers); got {layer_idx}")
    types = getattr(cfg, "layer_types", None)
    family = getattr(cfg, "model_type", None)
    if family in ("mistral", "phi3", "llama", "olmo2"):
        types = None  # transformers' attention classes of these families ignore layer_types
    if types:
        if not 0 <= layer_idx < len(types):
            raise ValueError(f"layer_idx must be in [0, {len(types)}) (layer_types); "
                             f"got {layer_idx}")
        kind = types[layer_idx]
        if kind not in LAYER_TYPES:
            raise ValueError(f"layer_types[{layer_idx}] = {kind!r} is not supported; "
                             f"expected one of {LAYER_TYPES}")
        return kind
    sliding = False
    if family in ("gemma2", "gpt_oss"):
        sliding = layer_idx % 2 == 0
    elif family in ("gemma3", "gemma3_text"):
        pattern = getattr(cfg, "sliding_window_pattern", None) or getattr(
            cfg, "_sliding_window_pattern", 6)
        sliding = bool((layer_idx + 1) % pattern)
    elif family in ("qwen2", "qwen3"):
        sliding = bool(getattr(cfg, "use_sliding_window", False)) and layer_idx >= getattr(
            cfg, "max_window_layers", 0)
    elif family in ("mistral", "phi3"):
        sliding = getattr(cfg, "sliding_window", None) is not None
    return LAYER_TYPES[sliding]


def _rope_parameters(cfg, kind: str) -> dict | None:
    """The flat rope dict of a layer of type ``kind`` (None: a layer without rope)."""
    params = getattr(cfg, "rope_parameters", None)
    if params:
        if any(key in LAYER_TYPES for key in params):  # nested per layer type (Gemma3)
            if kind not in params:
                raise ValueError(f"rope_parameters has no entry for layer type {kind!r}; "
                                 f"got {sorted(params)}")
            return None if params[kind] is None else dict(params[kind])
        return dict(params)
    # transformers 4.x spelling: rope_theta (+ rope_local_base_freq) and rope_scaling
    if kind == "sliding_attention" and getattr(cfg, "rope_local_base_freq", None) is not None:
        return {"rope_type": "default", "rope_theta": cfg.rope_local_base_freq}
    out = dict(getattr(cfg, "rope_scaling", None) or {})
    out.setdefault("rope_theta", getattr(cfg, "rope_theta", None) or 10_000.0)
    partial = getattr(cfg, "partial_rotary_factor", None)
    if partial is None:
        partial = getattr(cfg, "rotary_pct", None)  # GPT-NeoX 4.x
    if partial is not None:
        out.setdefault("partial_rotary_factor", partial)
    return out


def rope_from_hf(hf_config, layer_idx: int = 0) -> Rope | None:
    """The rotary embedding of layer ``layer_idx`` of a transformers config.

    Follows ``transformers.modeling_rope_utils``: ``rope_type`` ``default`` / ``linear`` /
    ``dynamic`` / ``llama3`` / ``yarn`` / ``longrope``; ``partial_rotary_factor`` gives
    ``rotary_dim = int(head_dim * factor)``; llama3 / yarn / longrope take
    ``original_max_position_embeddings`` from the config's top level when it has one (Phi3),
    else from the rope dict, else ``max_position_embeddings``; ``dynamic`` scales from
    ``max_position_embeddings``; yarn's and longrope's missing ``factor`` is
    ``max_position_embeddings / original_max_position_embeddings``. GPT-J: interleaved
    pairs over ``rotary_dim``.

    Returns:
      a :class:`Rope`, or ``None`` for a layer without rotary embedding.

    Raises:
      ValueError: an unknown ``rope_type`` or a rope key that type does not read.
    """
    cfg = _text_config(hf_config)
    if getattr(cfg, "model_type", None) == "gptj":
        return Rope(10_000.0, rotary_dim=getattr(cfg, "rotary_dim", None), layout="interleaved")
    params = _rope_parameters(cfg, layer_type(cfg, layer_idx))
    if params is None:
        return None
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in _TYPES:
        raise ValueError(f"rope_parameters['rope_type'] = {kind!r} is not supported; "
                         f"supported: {sorted(_TYPES)}")
    unknown = {k for k, v in params.items()
               if k not in _COMMON_KEYS | _KEYS[kind] and v is not None}
    if unknown:
        raise ValueError(f"rope_parameters keys {sorted(unknown)} are not supported with "
                         f"rope_type={kind!r} (it reads {sorted(_KEYS[kind])})")
    head_dim = _head_dim(cfg)
    rotary_dim = int(head_dim * (params.get("partial_rotary_factor") or 1.0))
    kw: dict[str, Any] = {"theta": params.get("rope_theta") or 10_000.0,
                          "scaling": _TYPES[kind],
                          "rotary_dim": None if rotary_dim == head_dim else rotary_dim}
    max_pos = getattr(cfg, "max_position_embeddings", None)
    if kind in ("llama3", "yarn", "longrope"):
        top = getattr(cfg, "original_max_position_embeddings", None)
        omp = top or params.get("original_max_position_embeddings") or max_pos
        kw["original_max_position"] = omp
        factor = params.get("factor")
        kw["factor"] = max_pos / omp if factor is None and kind != "llama3" else factor
    elif kind in ("linear", "dynamic"):
        kw["factor"] = params["factor"]
    if kind == "dynamic":
        kw["original_max_position"] = max_pos
    if kind == "llama3":
        kw["low_freq_factor"] = params["low_freq_factor"]
        kw["high_freq_factor"] = params["high_freq_factor"]
    if kind == "yarn":
        kw.update(beta_fast=params.get("beta_fast") or 32.0,
                  beta_slow=params.get("beta_slow") or 1.0,
                  truncate=bool(params.get("truncate", True)),
                  mscale=params.get("mscale"), mscale_all_dim=params.get("mscale_all_dim"))
    if kind in ("yarn", "longrope"):
        kw["attention_factor"] = params.get("attention_factor")
    if kind == "longrope":
        kw["short_factor"] = params["short_factor"]
        kw["long_factor"] = params["long_factor"]
    rope = Rope(**kw)
    rope.check(head_dim)
    return rope


def attention_kwargs_from_hf(hf_config, layer_idx: int = 0) -> dict[str, Any]:
    """Keyword arguments of :class:`attention_jax.MultiHeadAttention` for one layer.

    Keys: ``in_features``, ``num_heads``, ``num_kv_heads``, ``head_dim``,
    ``out_features``; ``q_bias`` / ``k_bias`` / ``v_bias`` / ``o_bias`` (bools; Qwen2:
    q, k, v but not o; Phi3: none; the others: the config's ``attention_bias`` on all
    four); ``rope`` (:func:`rope_from_hf`); ``qk_norm``: ``None``, ``"head"`` (RMSNorm
    over each head's H features of q and k before rope: Qwen3, Gemma3) or ``"full"``
    (RMSNorm over the whole projected width, N*H for q and K*H for k, before the split
    into heads: OLMo2); ``qk_norm_eps`` (the config's ``rms_norm_eps``); ``softcap``
    (Gemma's ``attn_logit_softcapping``, else None); ``sliding_window`` (this layer's
    window W: keys ``t - W < s <= t``; None on global layers); ``sinks`` (gpt-oss's
    learned per-head sink logit); ``scale`` (Gemma: ``query_pre_attn_scalar ** -0.5``;
    else None, i.e. ``head_dim ** -0.5`` as transformers); ``dropout_rate``
    (``attention_dropout``).

    Note: Gemma3's q/k RMSNorm multiplies by ``1 + weight`` (Qwen3's and OLMo2's by
    ``weight``); that is a matter of the loaded weights, not of these settings.

    Raises:
      ValueError: a family not in :data:`FAMILIES`, a layer index out of range, or a
        setting that changes attention and is not mapped (named in the message).
    """
    cfg = _text_config(hf_config)
    family = getattr(cfg, "model_type", None)
    if family == "gemma3_text":
        family = "gemma3"
    if family not in FAMILIES:
        raise ValueError(f"model_type {family!r} is not supported; supported: {FAMILIES}")
    if getattr(cfg, "use_bidirectional_attention", None):
        raise ValueError("use_bidirectional_attention=True (bidirectional sliding windows) is "
                         "not supported")
    num_heads = cfg.num_attention_heads
    num_kv_heads = getattr(cfg, "num_key_value_heads", None) or num_heads
    head_dim = _head_dim(cfg)
    bias = bool(getattr(cfg, "attention_bias", False))
    if family == "qwen2":
        biases = (True, True, True, False)
    elif family in ("mistral", "phi3"):
        biases = (False,) * 4
    else:
        biases = (bias,) * 4
    kind = layer_type(cfg, layer_idx)
    window = None
    if kind == "sliding_attention" and family not in ("llama", "olmo2"):
        window = getattr(cfg, "sliding_window", None)
        if window is None:
            raise ValueError(f"layer {layer_idx} is a sliding_attention layer but "
                             "sliding_window is None")
    qk_norm = {"qwen3": "head", "gemma3": "head", "olmo2": "full"}.get(family)
    gemma = family in ("gemma2", "gemma3")
    return {
        "in_features": cfg.hidden_size,
        "num_heads": num_heads,
        "num_kv_heads": num_kv_heads,
        "head_dim": head_dim,
        "out_features": cfg.hidden_size,
        "q_bias": biases[0], "k_bias": biases[1], "v_bias": biases[2], "o_bias": biases[3],
        "rope": rope_from_hf(cfg, layer_idx),
        "qk_norm": qk_norm,
        "qk_norm_eps": float(getattr(cfg, "rms_norm_eps", 1e-6)),
        "qk_norm_offset": 1.0 if family == "gemma3" else 0.0,  # Gemma 3: x * (1 + w)
        "softcap": getattr(cfg, "attn_logit_softcapping", None) if gemma else None,
        "sliding_window": window,
        "sinks": family == "gpt_oss",
        "scale": cfg.query_pre_attn_scalar ** -0.5 if gemma else None,
        "dropout_rate": float(getattr(cfg, "attention_dropout", 0.0) or 0.0),
    }
