"""A minimal decoder in jax.numpy around our attention; greedy generation checked against
transformers.

:func:`load_decoder` reads a transformers causal LM of :data:`DECODER_FAMILIES`: per layer
our attention (:func:`attention_jax.interop.from_hf`, run by
:func:`attention_jax.layer.decode_layer`), the family's RMSNorm (Gemma: ``x * (1 + w)``),
gated MLP (Phi3's fused ``gate_up_proj``; gpt-oss: top-k routed experts, clamped SwiGLU),
Gemma's sandwich norms, embedding scale and final soft-capping, OLMo2's post-norms, a tied
or untied head. :func:`generate_padded` greedy-decodes ``input_ids [B, T]`` with an
``attention_mask`` (left padding, as transformers batches prompts), one
:class:`~attention_jax.cache.KVCache` per layer: the prompts are prefilled as they are, the
left padding marked with :func:`attention_jax.cache.left_padded` (positions then count from
each row's first real token, transformers' ``cumsum(attention_mask) - 1``), then one-token
steps, each row at its own length. Two compiled functions per model.

    python experiments/hf_generate.py --model PATH --prompt "Hello" --max-new-tokens 20
    python experiments/hf_generate.py --model PATH --ids 1,2,3 --ids 4,5 --check

``PATH``: a local checkpoint folder (``local_files_only=True``: nothing is downloaded;
``--prompt`` needs its tokenizer, ``--ids`` does not) or ``tiny:<family>``
(:func:`tiny_model`); ``--check`` compares with ``model.generate(do_sample=False)``.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import pathlib
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from attention_jax import cache as kv_cache
from attention_jax import hf, interop
from attention_jax.config import AttentionConfig
from attention_jax.layer import decode_layer

DECODER_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3", "gpt_oss",
                    "olmo2")
TINY = {"vocab_size": 97, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
        "max_position_embeddings": 64, "rms_norm_eps": 1e-6, "bos_token_id": None,
        "eos_token_id": None, "pad_token_id": 0}


@dataclasses.dataclass(frozen=True)
class DecoderSpec:
    """The static part of a decoder (hashable: the jitted functions close over it)."""

    family: str
    attention: tuple[AttentionConfig, ...]  # one per layer
    eps: float
    one_plus_norm: bool = False  # Gemma: x * (1 + w)
    embed_scale: float | None = None  # Gemma: sqrt(hidden)
    activation: str = "silu"
    norms: str = "pre"  # "pre" (Llama), "sandwich" (Gemma 2/3), "post" (OLMo2)
    final_softcap: float | None = None  # Gemma2
    moe: tuple[int, float, float] | None = None  # gpt-oss: (top_k, swiglu alpha, limit)


def _np(t) -> np.ndarray:  # a copy: a view would let jax alias the torch tensor's memory
    return np.array(t.detach().cpu().float().numpy(), copy=True)


def load_decoder(model) -> tuple[DecoderSpec, dict[str, Any]]:
    """``(spec, weights)`` of a transformers causal LM (weights: a pytree of jnp arrays).

    Raises:
      ValueError: a family outside :data:`DECODER_FAMILIES`, a setting the decoder does not
        implement (``mlp_bias``, the activation), or an unsupported attention setting (from
        :func:`~attention_jax.interop.from_hf`), named.
    """
    cfg = hf._text_config(model.config)
    family = "gemma3" if cfg.model_type == "gemma3_text" else cfg.model_type
    if family not in DECODER_FAMILIES:
        raise ValueError(f"model_type {family!r}: the example decoder covers {DECODER_FAMILIES}")
    activation = getattr(cfg, "hidden_activation", None) or cfg.hidden_act
    if activation not in ACTIVATIONS:
        raise ValueError(f"hidden activation {activation!r} is not supported; supported: "
                         f"{sorted(ACTIVATIONS)}")
    if getattr(cfg, "mlp_bias", False):
        raise ValueError("mlp_bias=True (biases on the MLP projections) is not supported")
    base = model.model
    gemma = family in ("gemma2", "gemma3")
    layers, configs = [], []
    for i, block in enumerate(base.layers):
        attn = interop.from_hf(block.self_attn, cfg, layer_idx=i)
        configs.append(attn.config)
        w = {"attn": {k: v for k, v in attn.param_values().items() if v is not None},
             **_mlp_weights(block.mlp, family)}
        names = {"pre": ("input_layernorm", "post_attention_layernorm"),
                 "post": ("post_attention_layernorm", "post_feedforward_layernorm"),
                 "sandwich": ("input_layernorm", "post_attention_layernorm",
                              "pre_feedforward_layernorm", "post_feedforward_layernorm")}
        kind = "sandwich" if gemma else "post" if family == "olmo2" else "pre"
        for name in names[kind]:
            w[name] = _np(getattr(block, name).weight)
        layers.append(w)
    weights = {"embed": _np(base.embed_tokens.weight), "norm": _np(base.norm.weight),
               "layers": layers}
    if not cfg.tie_word_embeddings:
        weights["head"] = _np(model.lm_head.weight)
    spec = DecoderSpec(
        family, tuple(configs), float(cfg.rms_norm_eps), one_plus_norm=gemma,
        embed_scale=float(cfg.hidden_size) ** 0.5 if gemma else None,
        activation=activation,
        norms=kind, final_softcap=getattr(cfg, "final_logit_softcapping", None),
        moe=(cfg.num_experts_per_tok, float(cfg.swiglu_alpha), float(cfg.swiglu_limit))
        if family == "gpt_oss" else None)
    return spec, jax.tree.map(jnp.asarray, weights)


def _mlp_weights(mlp, family: str) -> dict[str, np.ndarray]:
    """Gated MLP ``gate, up [D, F]``, ``down [F, D]``; gpt-oss: ``router [D, E]`` + bias,
    experts ``gate, up [E, D, F]`` (its interleaved columns split), ``down [E, F, D]``,
    biases."""
    if family == "gpt_oss":
        r, e = mlp.router, mlp.experts
        gate_up, gate_up_b = _np(e.gate_up_proj), _np(e.gate_up_proj_bias)  # [E, D, 2F]
        return {"router": _np(r.weight).T, "router_b": _np(r.bias),
                "gate": gate_up[..., ::2], "gate_b": gate_up_b[..., ::2],
                "up": gate_up[..., 1::2], "up_b": gate_up_b[..., 1::2],
                "down": _np(e.down_proj), "down_b": _np(e.down_proj_bias)}
    if family == "phi3":
        gate, up = np.split(_np(mlp.gate_up_proj.weight), 2, axis=0)
    else:
        gate, up = _np(mlp.gate_proj.weight), _np(mlp.up_proj.weight)
    return {"gate": gate.T, "up": up.T, "down": _np(mlp.down_proj.weight).T}


def _moe(x, w, spec: DecoderSpec):
    """gpt-oss's MLP ``[B, t, D]``: softmax over the top-k router logits, each chosen
    expert's ``(clamp(up) + 1) * g * sigmoid(alpha * g)`` with ``g = min(gate, limit)``.
    Every expert is computed (E is small here) and weighted by the routing (0 off top-k)."""
    top_k, alpha, limit = spec.moe
    logits = x @ w["router"] + w["router_b"]  # [B, t, E]
    top, idx = jax.lax.top_k(logits, top_k)  # [B, t, k]
    route = jnp.sum(jax.nn.one_hot(idx, logits.shape[-1]) * jax.nn.softmax(top)[..., None],
                    axis=-2)  # [B, t, E]
    gate = jnp.minimum(jnp.einsum("btd,edf->btef", x, w["gate"]) + w["gate_b"], limit)
    up = jnp.clip(jnp.einsum("btd,edf->btef", x, w["up"]) + w["up_b"], -limit, limit)
    hidden = (up + 1.0) * gate * jax.nn.sigmoid(gate * alpha)  # [B, t, E, F]
    out = jnp.einsum("btef,efd->bted", hidden, w["down"]) + w["down_b"]  # [B, t, E, D]
    return jnp.einsum("bte,bted->btd", route, out)


def rms_norm(x, w, spec: DecoderSpec):
    """The family's RMSNorm, in float32 (``x / rms(x) * w``; Gemma ``* (1 + w)``)."""
    x = x.astype(jnp.float32)
    x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + spec.eps)
    return x * (1.0 + w if spec.one_plus_norm else w)


ACTIVATIONS = {"silu": jax.nn.silu, "swish": jax.nn.silu,
               "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
               "gelu": functools.partial(jax.nn.gelu, approximate=False)}


def forward(spec: DecoderSpec, weights, ids, caches, valid_lengths=None):
    """Logits ``[B, t, vocab]`` of ``ids [B, t]`` after the cached tokens; the new caches."""
    h = weights["embed"][ids]  # [B, t, D]
    if spec.embed_scale is not None:
        h = h * jnp.asarray(spec.embed_scale, h.dtype)
    new_caches = []
    for cfg, w, cache in zip(spec.attention, weights["layers"], caches, strict=True):
        x = h if spec.norms == "post" else rms_norm(h, w["input_layernorm"], spec)
        a, cache = decode_layer(cfg, w["attn"], x, cache, valid_lengths=valid_lengths)
        new_caches.append(cache)
        if spec.norms != "pre":
            a = rms_norm(a, w["post_attention_layernorm"], spec)
        h = h + a
        if spec.norms == "pre":
            x = rms_norm(h, w["post_attention_layernorm"], spec)
        elif spec.norms == "sandwich":
            x = rms_norm(h, w["pre_feedforward_layernorm"], spec)
        else:
            x = h
        if spec.moe is not None:
            m = _moe(x, w, spec)
        else:
            m = ACTIVATIONS[spec.activation](x @ w["gate"]) * (x @ w["up"]) @ w["down"]
        if spec.norms != "pre":
            m = rms_norm(m, w["post_feedforward_layernorm"], spec)
        h = h + m
    h = rms_norm(h, weights["norm"], spec)
    logits = h @ weights.get("head", weights["embed"]).T  # [B, t, vocab]
    if spec.final_softcap is not None:
        logits = jnp.tanh(logits / spec.final_softcap) * spec.final_softcap
    return logits, new_caches


@functools.lru_cache(maxsize=32)
def _compiled(spec: DecoderSpec):
    prefill = jax.jit(functools.partial(forward, spec))
    step = jax.jit(functools.partial(forward, spec), donate_argnums=(2,))
    return prefill, step


def init_caches(spec: DecoderSpec, batch: int, max_length: int) -> list[kv_cache.KVCache]:
    return [kv_cache.init_cache(batch, max_length, c.num_kv_heads, c.head_dim, c.v_head_dim,
                                c.param_dtype) for c in spec.attention]


def left_pad(prompts: list[list[int]], pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``(input_ids, attention_mask)`` ``[B, T]`` int32 of prompts left-padded to the longest,
    as transformers batches them for generation."""
    if not prompts or min(len(p) for p in prompts) < 1:
        raise ValueError(f"every prompt needs a token; got lengths {[len(p) for p in prompts]}")
    width = max(len(p) for p in prompts)
    ids = np.full((len(prompts), width), pad_id, np.int32)
    mask = np.zeros((len(prompts), width), np.int32)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):], mask[i, width - len(p):] = p, 1
    return ids, mask


def padding(attention_mask) -> tuple[np.ndarray, np.ndarray]:
    """``(starts, ends)`` ``[B]``: each row's real tokens are ``starts <= i < ends``.

    Raises:
      ValueError: a row without a real token, or with padding between real tokens (left and
        right padding only: transformers' sliding windows count the slots of the holes).
    """
    mask = np.asarray(attention_mask).astype(bool)  # [B, T]
    starts, ends = mask.argmax(axis=1), mask.shape[1] - mask[:, ::-1].argmax(axis=1)
    for row, m in enumerate(mask):
        if not m.any() or not m[starts[row]:ends[row]].all():
            raise ValueError(f"attention_mask row {row} must hold one run of real tokens "
                             f"(left or right padding); got {m.astype(int).tolist()}")
    return starts.astype(np.int32), ends.astype(np.int32)


def prefill_logits(spec: DecoderSpec, weights, input_ids, attention_mask,
                   max_length: int | None = None):
    """``(logits [B, T, vocab], caches, ends [B])`` of padded ``input_ids [B, T]`` prefilled
    as they are: left padding through :func:`attention_jax.cache.left_padded` (those slots are
    never attended to; positions count from each row's first real token, as transformers'
    ``position_ids = cumsum(attention_mask) - 1``), right padding through ``valid_lengths``."""
    ids = np.asarray(input_ids)
    starts, ends = padding(attention_mask)
    if ids.shape != np.shape(attention_mask):
        raise ValueError(f"input_ids {ids.shape} and attention_mask "
                         f"{np.shape(attention_mask)} must be one [B, T] shape")
    caches = [kv_cache.left_padded(c, jnp.asarray(starts))
              for c in init_caches(spec, ids.shape[0], max_length or ids.shape[1])]
    prefill, _ = _compiled(spec)
    logits, caches = prefill(weights, jnp.asarray(ids), caches, jnp.asarray(ends))
    return logits, caches, ends


def generate_padded(spec: DecoderSpec, weights, input_ids, attention_mask,
                    max_new_tokens: int) -> np.ndarray:
    """Greedy continuation ``[B, max_new_tokens]`` of padded prompts ``input_ids [B, T]``
    (``attention_mask`` 1 on real tokens; left padding as transformers')."""
    width = np.asarray(input_ids).shape[1]
    logits, caches, ends = prefill_logits(spec, weights, input_ids, attention_mask,
                                          width + max_new_tokens)
    token = jnp.argmax(logits[jnp.arange(len(ends)), ends - 1], axis=-1)  # [B]
    out, (_, step) = [token], _compiled(spec)
    for _ in range(max_new_tokens - 1):
        logits, caches = step(weights, token[:, None], caches)  # [B, 1, vocab]
        out.append(token := jnp.argmax(logits[:, 0], axis=-1))
    return np.asarray(jnp.stack(out, axis=1))


def hf_generate(model, input_ids, attention_mask, max_new_tokens: int,
                pad_id: int = 0) -> np.ndarray:
    """transformers' greedy continuation ``[B, max_new_tokens]`` of the same padded ids."""
    import torch

    with torch.no_grad():
        out = model.generate(torch.as_tensor(np.asarray(input_ids), dtype=torch.long),
                             attention_mask=torch.as_tensor(np.asarray(attention_mask)),
                             do_sample=False, max_new_tokens=max_new_tokens,
                             min_new_tokens=max_new_tokens, pad_token_id=pad_id,
                             eos_token_id=None)
    return out[:, np.asarray(input_ids).shape[1]:].numpy()


def tiny_config(family: str, **overrides):
    """A small config of ``family``: 2 layers (a windowed one and a global one where the family
    alternates them), eager attention."""
    import transformers as tf

    kw = {**TINY, **overrides}
    extra = {
        "llama": {"rope_parameters": {"rope_type": "llama3", "factor": 8.0,
                                      "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                      "original_max_position_embeddings": 16,
                                      "rope_theta": 500_000.0}},
        "mistral": {"sliding_window": 4},
        "qwen2": {"use_sliding_window": True, "sliding_window": 4, "max_window_layers": 1},
        "qwen3": {"use_sliding_window": True, "sliding_window": 4, "max_window_layers": 1},
        "gemma2": {"query_pre_attn_scalar": 16, "sliding_window": 4,
                   "attn_logit_softcapping": 20.0, "final_logit_softcapping": 10.0},
        "gemma3": {"query_pre_attn_scalar": 16, "sliding_window": 4,
                   "layer_types": ["sliding_attention", "full_attention"], "rope_parameters": {
                       "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6},
                       "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}},
        "phi3": {"sliding_window": 4},
        "gpt_oss": {"sliding_window": 4, "num_local_experts": 3, "num_experts_per_tok": 2,
                    "attention_bias": True},
        "olmo2": {},
    }[family]
    classes = {"llama": "LlamaConfig", "mistral": "MistralConfig", "qwen2": "Qwen2Config",
               "qwen3": "Qwen3Config", "gemma2": "Gemma2Config", "gemma3": "Gemma3TextConfig",
               "phi3": "Phi3Config", "gpt_oss": "GptOssConfig", "olmo2": "Olmo2Config"}
    if family == "phi3":
        kw.pop("head_dim")
    cfg = getattr(tf, classes[family])(**{**kw, **extra})
    cfg._attn_implementation = "eager"
    return cfg


def tiny_model(family: str, seed: int = 0, **overrides):
    """``AutoModelForCausalLM`` of :func:`tiny_config`, float32, eval, random weights: linears
    and experts ``N(0, 1/in)``, embeddings ``N(0, 1)`` (Gemma ``N(0, 0.01/hidden)``: scaled by
    ``sqrt(hidden)`` and tied, larger ones make it repeat its last token), norms
    ``1 + N(0, 0.1)`` (Gemma ``N(0, 0.1)``), sinks ``N(0, 1)``, other vectors ``N(0, 0.1)``."""
    import torch
    import transformers as tf

    cfg = tiny_config(family, **overrides)
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    gemma = family in ("gemma2", "gemma3")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0.0, 0.1)
                if not gemma:
                    p.add_(1.0)
            elif "embed" in name:
                p.normal_(0.0, 0.1 * cfg.hidden_size ** -0.5 if gemma else 1.0)
            elif name.endswith("sinks"):
                p.normal_(0.0, 1.0)
            elif p.ndim == 2 or ("experts" in name and p.ndim == 3):  # [out, in] / [E, in, out]
                p.normal_(0.0, p.shape[1] ** -0.5)
            else:
                p.normal_(0.0, 0.1)
    model.generation_config.eos_token_id = None
    return model


def main(argv: list[str] | None = None) -> int:
    """``hf_generate.py --model PATH [--prompt TEXT | --ids 1,2,3]... [--max-new-tokens N]
    [--check]``: prints a JSON report (family, layers, tokens, text with a tokenizer, and with
    ``--check`` transformers' tokens and ``equal``); returns 1 when ``--check`` differs."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True,
                        help="a local checkpoint folder, or tiny:<family> (random weights)")
    parser.add_argument("--prompt", action="append", default=[],
                        help="a text prompt (repeat for a batch; needs the folder's tokenizer)")
    parser.add_argument("--ids", action="append", default=[],
                        help="a prompt as comma-separated token ids, e.g. 1,2,3 (repeatable)")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--check", action="store_true",
                        help="also run transformers' generate(do_sample=False) and compare")
    parser.add_argument("--out", type=pathlib.Path, metavar="DIR",  # the CLI always gives one
                        help="also write the report to DIR/hf_generate.json")
    args = parser.parse_args(argv)
    if args.max_new_tokens < 1:
        parser.error(f"--max-new-tokens must be >= 1; got {args.max_new_tokens}")
    prompts = [[int(t) for t in ids.split(",")] for ids in args.ids]
    tokenizer = None
    if args.model.startswith("tiny:"):
        if args.prompt:
            raise SystemExit("--prompt needs a tokenizer: give tiny models --ids")
        model = tiny_model(args.model[5:])
    else:
        import torch
        import transformers as tf

        model = tf.AutoModelForCausalLM.from_pretrained(
            args.model, local_files_only=True, attn_implementation="eager",
            dtype=torch.float32).eval()
        if args.prompt or not prompts:
            tokenizer = tf.AutoTokenizer.from_pretrained(args.model, local_files_only=True)
            prompts += [tokenizer(p)["input_ids"] for p in args.prompt or ["Hello"]]
    spec, weights = load_decoder(model)
    pad = int(model.config.pad_token_id or 0)
    ids, mask = left_pad(prompts or [[1, 2, 3]], pad)
    ours = generate_padded(spec, weights, ids, mask, args.max_new_tokens)
    report: dict[str, Any] = {"family": spec.family, "layers": len(spec.attention),
                              "tokens": ours.tolist()}
    if tokenizer is not None:
        report["text"] = [tokenizer.decode(row) for row in ours]
    if args.check:
        theirs = hf_generate(model, ids, mask, args.max_new_tokens, pad_id=pad)
        report["transformers"] = theirs.tolist()
        report["equal"] = bool((theirs == ours).all())
    print(json.dumps(report, indent=1))
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "hf_generate.json").write_text(json.dumps(report, indent=1) + "\n")
    return 0 if report.get("equal", True) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
