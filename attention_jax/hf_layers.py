"""Hugging Face attention layers in and out: :func:`from_hf` and :func:`to_hf`.

:func:`from_hf` builds a :class:`attention_jax.MultiHeadAttention` from a transformers
attention layer of the families of :data:`attention_jax.hf.FAMILIES` (``LlamaAttention``,
``MistralAttention``, ``Qwen2Attention``, ``Qwen3Attention``, ``Gemma2Attention``,
``Gemma3Attention``, ``Phi3Attention``, ``GptOssAttention``, ``Olmo2Attention``) and its
model config: the settings come from :func:`attention_jax.hf.attention_kwargs_from_hf`, the
weights from the layer (Linear layout ``[out, in]`` through
:func:`attention_jax.interop.load_linear_weights`; Phi3's fused ``qkv_proj`` split by rows
``[q; k; v]``), the q/k RMSNorm scales (Gemma 3's ``weight`` as it is, with ``qk_norm_offset=1.0``),
and gpt-oss's sinks. :func:`to_hf` writes a module's weights back into such a layer.

Weight mapping (N query heads, K kv heads, H head size, D width):

=================================  ==========================================
transformers                       ours
=================================  ==========================================
``q_proj.weight [N*H, D]``          ``q_kernel [D, N, H]`` (k, v, o alike)
``qkv_proj.weight [(N+2K)*H, D]``   ``q_kernel``, ``k_kernel``, ``v_kernel`` (Phi3)
``q_norm.weight [H]``               ``q_norm [H]`` (Gemma 3: the same, ``qk_norm_offset=1.0``)
``q_norm.weight [N*H]``             ``q_norm [N, H]`` (OLMo2, ``qk_norm="full"``)
``sinks [N]``                       ``sinks [N]`` (gpt-oss)
=================================  ==========================================

torch is never imported here: the layer's tensors are read with ``.detach().cpu().numpy()``
and written with ``.copy_`` under ``torch.no_grad`` taken from the layer's own module.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np

from attention_jax import hf
from attention_jax.modules import MultiHeadAttention

# transformers attention class -> family (model_type of its config)
LAYER_CLASSES = {
    "LlamaAttention": "llama", "MistralAttention": "mistral", "Qwen2Attention": "qwen2",
    "Qwen3Attention": "qwen3", "Gemma2Attention": "gemma2", "Gemma3Attention": "gemma3",
    "Phi3Attention": "phi3", "GptOssAttention": "gpt_oss", "Olmo2Attention": "olmo2",
}


def _interop():
    # imported when called: attention_jax.interop re-exports from_hf / to_hf from here
    from attention_jax import interop

    return interop


def _numpy(tensor) -> np.ndarray:
    """A float32 copy (a view would let jax alias the torch tensor's memory)."""
    return np.array(tensor.detach().cpu().float().numpy(), copy=True)


def _family(layer, config) -> str:
    name = type(layer).__name__
    if name not in LAYER_CLASSES:
        raise ValueError(f"layer of type {name} is not supported; supported: "
                         f"{sorted(LAYER_CLASSES)}")
    family = LAYER_CLASSES[name]
    model_type = getattr(hf._text_config(config), "model_type", None)
    if model_type == "gemma3_text":
        model_type = "gemma3"
    if model_type != family:
        raise ValueError(f"config.model_type is {model_type!r} but the layer is a {name} "
                         f"({family!r})")
    return family


def _check_layer(layer, kw: dict[str, Any], family: str) -> None:
    """The layer's own attention settings agree with the mapped ones (else: which differs)."""
    H = kw["head_dim"]
    scale = H ** -0.5 if kw["scale"] is None else kw["scale"]
    scaling = getattr(layer, "scaling", scale)
    if not np.isclose(scaling, scale, rtol=1e-6):
        raise ValueError(f"layer.scaling = {scaling} differs from the config's scale {scale} "
                         "(a changed scaling is not supported)")
    if getattr(layer, "is_causal", True) is not True:
        raise ValueError("layer.is_causal = False (bidirectional attention) is not supported")
    window = getattr(layer, "sliding_window", None)  # Mistral / Phi3 read the config's
    if hasattr(layer, "sliding_window") and window != kw["sliding_window"]:
        raise ValueError(f"layer.sliding_window = {window} but the config maps this layer to "
                         f"sliding_window={kw['sliding_window']}")
    cap = getattr(layer, "attn_logit_softcapping", None)
    if cap != kw["softcap"]:
        raise ValueError(f"layer.attn_logit_softcapping = {cap} but the config maps "
                         f"softcap={kw['softcap']}")
    if getattr(layer, "head_dim", H) != H:
        raise ValueError(f"layer.head_dim = {layer.head_dim} but the config maps head_dim={H}")
    for name in ("q_norm", "k_norm"):
        norm = getattr(layer, name, None)
        if (norm is None) != (kw["qk_norm"] is None):
            raise ValueError(f"layer.{name} is {'absent' if norm is None else 'present'} but "
                             f"the config maps qk_norm={kw['qk_norm']!r}")
        eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", None))
        if norm is not None and eps is not None and eps != kw["qk_norm_eps"]:
            raise ValueError(f"layer.{name} eps = {eps} but the config maps "
                             f"qk_norm_eps={kw['qk_norm_eps']} (rms_norm_eps)")


def _projections(layer, family: str, N: int, K: int, H: int):
    """``(q, k, v, o)`` as ``(weight, bias or None)`` numpy pairs in Linear layout."""
    def pair(linear, rows=slice(None)):
        bias = None if linear.bias is None else _numpy(linear.bias)[rows]
        return _numpy(linear.weight)[rows], bias

    if family == "phi3":  # fused [q; k; v] rows
        qkv = layer.qkv_proj
        q = pair(qkv, slice(0, N * H))
        k = pair(qkv, slice(N * H, (N + K) * H))
        v = pair(qkv, slice((N + K) * H, None))
    else:
        q, k, v = pair(layer.q_proj), pair(layer.k_proj), pair(layer.v_proj)
    return q, k, v, pair(layer.o_proj)


def from_hf(layer, config, *, layer_idx: int | None = None, rngs=None, dtype: Any = None,
            param_dtype: Any = jnp.float32) -> MultiHeadAttention:
    """Our attention module from a transformers attention layer and its model config.

    Args:
      layer: e.g. ``model.model.layers[i].self_attn`` (a class of :data:`LAYER_CLASSES`).
      config: its model config (Gemma3's multimodal config: its ``text_config`` is read).
      layer_idx: which layer of ``config`` (sliding window, per-layer rope); default
        ``layer.layer_idx``.
      rngs: ``nnx.Rngs`` for the module's construction (its initial values are replaced);
        default ``nnx.Rngs(0)``.
      dtype, param_dtype: the module's computation and parameter dtypes.

    Returns:
      a :class:`~attention_jax.MultiHeadAttention` whose ``__call__(x, is_causal=True,
      positions=position_ids)`` is the layer's forward with the model's rotary embedding
      and causal mask (sliding window included) and whose ``decode`` continues it. Its
      dropout (``attention_dropout``) follows the layer's mode: off for a layer in
      ``eval()`` (``deterministic=True``; ``module.train()`` turns it on).

    Raises:
      ValueError: an unsupported layer class, a config of another family, a configuration
        field that is not mapped (from :func:`~attention_jax.hf.attention_kwargs_from_hf`,
        or a layer setting such as ``scaling`` / ``sliding_window`` / ``is_causal`` that
        differs from its config), or a weight of an unexpected shape (named).
    """
    from flax import nnx

    family = _family(layer, config)
    if layer_idx is None:
        layer_idx = getattr(layer, "layer_idx", None)
        if layer_idx is None:
            raise ValueError("layer has no layer_idx; pass layer_idx")
    kw = hf.attention_kwargs_from_hf(config, layer_idx)
    _check_layer(layer, kw, family)
    module = MultiHeadAttention(**kw, dtype=dtype, param_dtype=param_dtype,
                                deterministic=not getattr(layer, "training", False),
                                rngs=nnx.Rngs(0) if rngs is None else rngs)
    N, K, H = kw["num_heads"], kw["num_kv_heads"], kw["head_dim"]
    _interop().load_linear_weights(module, *_projections(layer, family, N, K, H))
    if kw["qk_norm"] is not None:
        for name in ("q_norm", "k_norm"):
            param = getattr(module, name)
            w = _numpy(getattr(layer, name).weight)
            if w.size != param.size:
                raise ValueError(f"layer.{name}.weight has shape {tuple(w.shape)} but the "
                                 f"module's {name} is {tuple(param.shape)}")
            param.set_value(jnp.asarray(w.reshape(param.shape), param.dtype))
    if kw["sinks"]:
        s = _numpy(layer.sinks)
        if s.shape != tuple(module.sinks.shape):
            raise ValueError(f"layer.sinks has shape {tuple(s.shape)} but the module expects "
                             f"{tuple(module.sinks.shape)}")
        module.sinks.set_value(jnp.asarray(s, module.sinks.dtype))
    return module


def _write(tensor, value: np.ndarray) -> None:
    import torch  # the layer is a torch module: torch is there

    with torch.no_grad():
        tensor.copy_(torch.from_numpy(np.ascontiguousarray(value).reshape(tensor.shape)))


def to_hf(module: MultiHeadAttention, layer):
    """Writes ``module``'s weights into the transformers attention ``layer``, in place.

    The inverse of :func:`from_hf`: ``to_hf(from_hf(layer, cfg), layer)`` leaves every
    tensor of ``layer`` as it was, bit for bit (Gemma 3's q/k norm weights ``w`` are
    stored as they are, with ``qk_norm_offset=1.0`` in the config).

    Returns:
      ``layer``.

    Raises:
      ValueError: an unsupported layer class, or shapes / parameters that do not match
        (a bias, norm or sinks on one side only), named.
    """
    name = type(layer).__name__
    if name not in LAYER_CLASSES:
        raise ValueError(f"layer of type {name} is not supported; supported: "
                         f"{sorted(LAYER_CLASSES)}")
    family = LAYER_CLASSES[name]
    interop = _interop()
    weights = interop.to_linear_weights(module)
    if family == "phi3":
        targets = {"o": layer.o_proj}
        fused = [weights[p] for p in "qkv"]
        if any(b is not None for _, b in fused) or layer.qkv_proj.bias is not None:
            raise ValueError("Phi3 qkv_proj has no bias; the module must have none (q/k/v_bias)")
        w = np.concatenate([w for w, _ in fused], axis=0)
        interop._check_shape("qkv_proj.weight", tuple(layer.qkv_proj.weight.shape), w.shape)
        pending = [(layer.qkv_proj.weight, w)]
    else:
        targets = {"q": layer.q_proj, "k": layer.k_proj, "v": layer.v_proj, "o": layer.o_proj}
        pending = []
    for proj, linear in targets.items():
        w, b = weights[proj]
        interop._check_shape(f"{proj}_proj.weight", tuple(linear.weight.shape), w.shape)
        if (b is None) != (linear.bias is None):
            raise ValueError(f"{proj}_proj has {'no ' if linear.bias is None else ''}bias but "
                             f"the module has {'none' if b is None else 'one'}")
        pending.append((linear.weight, w))
        if b is not None:
            pending.append((linear.bias, b))
    for pname in ("q_norm", "k_norm"):
        param, norm = getattr(module, pname), getattr(layer, pname, None)
        if (param is None) != (norm is None):
            raise ValueError(f"{pname}: the layer has {'one' if norm is not None else 'none'} "
                             f"and the module {'one' if param is not None else 'none'}")
        if param is not None:
            w = np.asarray(param[...], np.float32)
            if w.size != norm.weight.numel():
                raise ValueError(f"{pname} has {w.size} values; layer.{pname}.weight has "
                                 f"shape {tuple(norm.weight.shape)}")
            pending.append((norm.weight, w))  # Gemma 3's 1 + w: qk_norm_offset=1.0
    sinks = getattr(layer, "sinks", None)
    if (module.sinks is None) != (sinks is None):
        raise ValueError("sinks: present on one side only (module sinks="
                         f"{module.sinks is not None}, layer {sinks is not None})")
    if sinks is not None:
        interop._check_shape("sinks", tuple(sinks.shape), tuple(module.sinks.shape))
        pending.append((sinks, np.asarray(module.sinks[...], np.float32)))
    for tensor, value in pending:  # every check passed: now write
        _write(tensor, value.astype(np.float32))
    return layer
