"""PyTorch reference attentions for the equivalence tests, and weight mapping helpers.

Imported only by tests that ``pytest.importorskip("torch")`` first, so torch is
imported at module level here. Nothing in this file is product code: the product's
own torch interop lives in ``attention_jax/interop.py``.

Every reference is written for this project from the semantics of one seed article
(``/work/shared/seeds``), with that article's known defects left out. All return
``(output, weights)`` with ``output [B, T, Do]`` and ``weights [B, N, T, S]``.

==========================  ====  ==========================================================
reference                   seed  what it reproduces
==========================  ====  ==========================================================
:class:`SplitCombineMHA`    001   one Linear per q/k/v/o, ``split_heads`` / ``combine_heads``,
                                  scale ``1/sqrt(head_dim)``, ``(B, 1, T, S)`` mask with
                                  0 = blocked filled with ``-1e9``; cross-attention through
                                  ``kdim`` / ``vdim``; bias on/off.
:class:`DkDvAttention`      003   q/k project to ``dk * heads``, v to ``dv * heads``, the
                                  output from ``dv * heads`` back to the model width.
:class:`GroupedKVAttention` 004   ``group_num`` key/value heads shared by groups of query
                                  heads; query head n reads kv head ``n // (N // K)``
                                  (``repeat_interleave``). K = N is MHA, K = 1 MQA. Unlike
                                  the article, the mask really masks (``masked_fill`` with
                                  ``-1e9``) and heads are merged by swapping the head and
                                  time axes.
:class:`HeadSplitMHA`       000   the *input* is split into N slices of ``E / N`` first;
                                  each head has its own bias-free ``Linear(E/N, E/N)`` for
                                  q, k and v; scores scaled by ``1/sqrt(E)`` (the full
                                  width); ``fc_out = Linear(E, E)`` with bias.
==========================  ====  ==========================================================

Masks passed to the references follow the seed convention: a tensor broadcastable to
``(B, 1, T, S)`` whose zeros (``False``) are blocked, i.e. exactly our boolean mask with
True = attend. A row that sees no key gives a uniform softmax in these references
(our product returns zeros there), so tests compare such rows against explicit zeros
instead.

Our parameter layout (``attention_jax.modules.PARAM_AXES``)::

    q_kernel [D, N, H] = q.weight.T.reshape(D, N, H)      q_bias [N, H]
    k_kernel [Dk, K, H], v_kernel [Dv, K, V]              k_bias [K, H], v_bias [K, V]
    o_kernel [N, V, Do] = o.weight.T.reshape(N, V, Do)    o_bias [Do]

:func:`params_from_ref` / :func:`grads_from_ref` read a reference (or the same
tensors' ``.grad``) in that layout, :func:`load_ref` writes our parameters into a
reference, :func:`params_from_torch_mha` / :func:`grads_from_torch_mha` do the same for
``torch.nn.MultiheadAttention``, and :func:`head_split_to_params` builds the
block-diagonal kernels that make our module equal :class:`HeadSplitMHA`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

Tensor = torch.Tensor

# Score given to blocked keys by the seed-001/003/004 style references.
MASK_FILL = -1e9


# ---------------------------------------------------------------------------
# Shared pieces
# ---------------------------------------------------------------------------


def split_heads(x: Tensor, heads: int) -> Tensor:
    """``[B, L, heads * d] -> [B, heads, L, d]``."""
    B, L, width = x.shape
    if width % heads:
        raise ValueError(f"width {width} is not divisible by {heads} heads")
    return x.reshape(B, L, heads, width // heads).permute(0, 2, 1, 3)


def combine_heads(x: Tensor) -> Tensor:
    """``[B, heads, L, d] -> [B, L, heads * d]`` (swaps the head and time axes back)."""
    B, heads, L, d = x.shape
    return x.permute(0, 2, 1, 3).reshape(B, L, heads * d)


def masked_softmax_attention(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float
) -> tuple[Tensor, Tensor]:
    """Plain attention on ``[B, N, T, H] x [B, N, S, H] x [B, N, S, V]``.

    Args:
      mask: broadcastable to ``[B, N, T, S]``; zeros are blocked (filled with
        :data:`MASK_FILL` before the softmax).

    Returns:
      ``(out [B, N, T, V], weights [B, N, T, S])``.
    """
    scores = torch.einsum("bnth,bnsh->bnts", q, k) * scale
    if mask is not None:
        scores = scores.masked_fill(mask == 0, MASK_FILL)
    weights = torch.softmax(scores, dim=-1)
    return torch.einsum("bnts,bnsv->bntv", weights, v), weights


class _Projected(nn.Module):
    """Holds ``q_proj``, ``k_proj``, ``v_proj``, ``o_proj`` and the head sizes.

    The attributes every mapping helper of this file reads: ``num_heads``,
    ``num_kv_heads``, ``head_dim``, ``v_head_dim``.
    """

    def __init__(self, d_model: int, num_heads: int, num_kv_heads: int, head_dim: int,
                 v_head_dim: int, kdim: int | None, vdim: int | None, bias: bool):
        super().__init__()
        if num_heads % num_kv_heads:
            raise ValueError(
                f"num_heads ({num_heads}) must be a multiple of kv heads ({num_kv_heads})"
            )
        kdim = d_model if kdim is None else kdim
        vdim = kdim if vdim is None else vdim
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads
        self.head_dim, self.v_head_dim = head_dim, v_head_dim
        self.q_proj = nn.Linear(d_model, num_heads * head_dim, bias=bias)
        self.k_proj = nn.Linear(kdim, num_kv_heads * head_dim, bias=bias)
        self.v_proj = nn.Linear(vdim, num_kv_heads * v_head_dim, bias=bias)
        self.o_proj = nn.Linear(num_heads * v_head_dim, d_model, bias=bias)


# ---------------------------------------------------------------------------
# References
# ---------------------------------------------------------------------------


class SplitCombineMHA(_Projected):
    """Seed 001: multi-head attention with split / combine heads and returned weights.

    Args:
      d_model: width of the queries and of the output; ``head_dim = d_model // num_heads``.
      num_heads: N.
      kdim, vdim: widths of the key and value inputs (cross-attention); default
        ``d_model`` and ``kdim``.
      bias: biases on the four Linear layers.
    """

    def __init__(self, d_model: int, num_heads: int, *, kdim: int | None = None,
                 vdim: int | None = None, bias: bool = True):
        if d_model % num_heads:
            raise ValueError(f"d_model ({d_model}) is not divisible by num_heads ({num_heads})")
        d_k = d_model // num_heads
        super().__init__(d_model, num_heads, num_heads, d_k, d_k, kdim, vdim, bias)

    def forward(self, query: Tensor, key: Tensor | None = None, value: Tensor | None = None,
                mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``query [B, T, D]``, ``key [B, S, Dk]``, ``value [B, S, Dv]``, mask ``(B, 1, T, S)``."""
        key = query if key is None else key
        value = key if value is None else value
        q = split_heads(self.q_proj(query), self.num_heads)  # [B, N, T, H]
        k = split_heads(self.k_proj(key), self.num_heads)  # [B, N, S, H]
        v = split_heads(self.v_proj(value), self.num_heads)  # [B, N, S, H]
        out, weights = masked_softmax_attention(q, k, v, mask, 1.0 / math.sqrt(self.head_dim))
        return self.o_proj(combine_heads(out)), weights  # [B, T, D]


class DkDvAttention(_Projected):
    """Seed 003: head sizes chosen apart from the model width, ``dk`` for q/k, ``dv`` for v.

    Scale ``1/sqrt(dk)``. Self-attention in the article; ``key`` / ``value`` may be
    given (same width ``dim``) for cross-attention.
    """

    def __init__(self, dim: int, dk: int, dv: int, num_heads: int, *, bias: bool = True):
        super().__init__(dim, num_heads, num_heads, dk, dv, None, None, bias)

    def forward(self, x: Tensor, key: Tensor | None = None, value: Tensor | None = None,
                mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``x [B, T, dim]`` -> ``([B, T, dim], [B, N, T, S])``."""
        key = x if key is None else key
        value = key if value is None else value
        q = split_heads(self.q_proj(x), self.num_heads)  # [B, N, T, dk]
        k = split_heads(self.k_proj(key), self.num_heads)  # [B, N, S, dk]
        v = split_heads(self.v_proj(value), self.num_heads)  # [B, N, S, dv]
        out, weights = masked_softmax_attention(q, k, v, mask, self.head_dim ** -0.5)
        return self.o_proj(combine_heads(out)), weights  # [B, T, dim]


class GroupedKVAttention(_Projected):
    """Seed 004 (corrected): MHA / GQA / MQA with ``group_num`` key/value heads.

    The K = ``group_num`` key/value heads are repeated ``N // K`` times each along the
    head axis (``repeat_interleave``), so query head n uses kv head ``n // (N // K)``.

    Args:
      hidden_size: model width D.
      num_heads: N query heads.
      group_num: K key/value heads, ``N % K == 0``.
      head_dim: H (default ``hidden_size // num_heads``); v_head_dim: V (default H).
      kdim, vdim: key / value input widths (cross-attention).
      bias: biases on the four Linear layers.
    """

    def __init__(self, hidden_size: int, num_heads: int, group_num: int, *,
                 head_dim: int | None = None, v_head_dim: int | None = None,
                 kdim: int | None = None, vdim: int | None = None, bias: bool = True):
        head_dim = hidden_size // num_heads if head_dim is None else head_dim
        v_head_dim = head_dim if v_head_dim is None else v_head_dim
        super().__init__(hidden_size, num_heads, group_num, head_dim, v_head_dim,
                         kdim, vdim, bias)

    def forward(self, hidden: Tensor, key: Tensor | None = None, value: Tensor | None = None,
                mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``hidden [B, T, D]`` -> ``([B, T, D], [B, N, T, S])``."""
        key = hidden if key is None else key
        value = key if value is None else value
        groups = self.num_heads // self.num_kv_heads
        q = split_heads(self.q_proj(hidden), self.num_heads)  # [B, N, T, H]
        k = split_heads(self.k_proj(key), self.num_kv_heads)  # [B, K, S, H]
        v = split_heads(self.v_proj(value), self.num_kv_heads)  # [B, K, S, V]
        k = k.repeat_interleave(groups, dim=1)  # [B, N, S, H]
        v = v.repeat_interleave(groups, dim=1)  # [B, N, S, V]
        out, weights = masked_softmax_attention(q, k, v, mask, self.head_dim ** -0.5)
        return self.o_proj(combine_heads(out)), weights  # [B, T, D]


class HeadSplitMHA(nn.Module):
    """Seed 000 layout: heads cut from the input, one small bias-free projection per head.

    ``x [B, L, E]`` is viewed as ``[B, L, N, E/N]``; head i applies its own
    ``Linear(E/N, E/N, bias=False)`` to slice i for q, k and v; scores are scaled by
    ``1/sqrt(E)``; blocked scores (mask == 0) are filled with ``-1e20`` before the
    scaling; head outputs are concatenated and projected by ``fc_out = Linear(E, E)``.

    The article's ``forward(values, keys, query, mask)`` argument order is not kept:
    this one takes ``(query, key, value, mask)`` like the other references.
    """

    def __init__(self, embed_size: int, heads: int):
        super().__init__()
        if embed_size % heads:
            raise ValueError(f"embed_size ({embed_size}) is not divisible by heads ({heads})")
        self.embed_size, self.heads, self.head_dim = embed_size, heads, embed_size // heads
        d = self.head_dim
        self.queries = nn.ModuleList(nn.Linear(d, d, bias=False) for _ in range(heads))
        self.keys = nn.ModuleList(nn.Linear(d, d, bias=False) for _ in range(heads))
        self.values = nn.ModuleList(nn.Linear(d, d, bias=False) for _ in range(heads))
        self.fc_out = nn.Linear(embed_size, embed_size)

    def forward(self, query: Tensor, key: Tensor | None = None, value: Tensor | None = None,
                mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``[B, T, E]``, ``[B, S, E]``, ``[B, S, E]``, mask ``(B, 1, T, S)``."""
        key = query if key is None else key
        value = key if value is None else value
        xq, xk, xv = (split_heads(x, self.heads) for x in (query, key, value))  # [B, N, L, E/N]
        outs, weights = [], []
        for i in range(self.heads):
            q = self.queries[i](xq[:, i])  # [B, T, E/N]
            k = self.keys[i](xk[:, i])  # [B, S, E/N]
            v = self.values[i](xv[:, i])  # [B, S, E/N]
            scores = torch.einsum("btd,bsd->bts", q, k)
            if mask is not None:
                scores = scores.masked_fill(mask[:, 0] == 0, -1e20)
            w = torch.softmax(scores / math.sqrt(self.embed_size), dim=-1)  # [B, T, S]
            outs.append(torch.einsum("bts,bsd->btd", w, v))
            weights.append(w)
        return self.fc_out(torch.cat(outs, dim=-1)), torch.stack(weights, dim=1)


# ---------------------------------------------------------------------------
# Layout mapping: torch Linear <-> our einsum kernels
# ---------------------------------------------------------------------------


def _np(t: Tensor | None) -> np.ndarray | None:
    return None if t is None else t.detach().cpu().numpy()


def kernel_from_linear(weight: Tensor, heads: int, dim: int) -> np.ndarray:
    """``Linear.weight [heads * dim, d_in] -> [d_in, heads, dim]`` (q/k/v kernels)."""
    out_width, d_in = weight.shape
    if out_width != heads * dim:
        raise ValueError(f"weight rows {out_width} != heads {heads} * dim {dim}")
    return _np(weight).T.reshape(d_in, heads, dim)


def out_kernel_from_linear(weight: Tensor, heads: int, dim: int) -> np.ndarray:
    """``Linear.weight [d_out, heads * dim] -> [heads, dim, d_out]`` (o_kernel)."""
    d_out, in_width = weight.shape
    if in_width != heads * dim:
        raise ValueError(f"weight columns {in_width} != heads {heads} * dim {dim}")
    return _np(weight).T.reshape(heads, dim, d_out)


def bias_from_linear(bias: Tensor | None, heads: int, dim: int) -> np.ndarray | None:
    """``[heads * dim] -> [heads, dim]`` (None stays None)."""
    return None if bias is None else _np(bias).reshape(heads, dim)


def linear_from_kernel(kernel: np.ndarray) -> np.ndarray:
    """Inverse of :func:`kernel_from_linear`: ``[d_in, heads, dim] -> [heads * dim, d_in]``."""
    kernel = np.asarray(kernel)
    return kernel.reshape(kernel.shape[0], -1).T


def linear_from_out_kernel(kernel: np.ndarray) -> np.ndarray:
    """Inverse of :func:`out_kernel_from_linear`: ``[heads, dim, d_out] -> [d_out, heads*dim]``."""
    kernel = np.asarray(kernel)
    return kernel.reshape(-1, kernel.shape[-1]).T


def _from_projections(
    q: Tensor, qb: Tensor | None, k: Tensor, kb: Tensor | None, v: Tensor, vb: Tensor | None,
    o: Tensor, ob: Tensor | None, N: int, K: int, H: int, V: int,
) -> dict[str, np.ndarray | None]:
    """Our parameter dict from the four weight matrices and biases of a reference."""
    return {
        "q_kernel": kernel_from_linear(q, N, H),
        "k_kernel": kernel_from_linear(k, K, H),
        "v_kernel": kernel_from_linear(v, K, V),
        "o_kernel": out_kernel_from_linear(o, N, V),
        "q_bias": bias_from_linear(qb, N, H),
        "k_bias": bias_from_linear(kb, K, H),
        "v_bias": bias_from_linear(vb, K, V),
        "o_bias": _np(ob),
    }


def _ref_tensors(ref: nn.Module, get: Callable[[Tensor | None], Tensor | None]) -> dict:
    sizes = (ref.num_heads, ref.num_kv_heads, ref.head_dim, ref.v_head_dim)
    lin = (ref.q_proj, ref.k_proj, ref.v_proj, ref.o_proj)
    flat = [t for layer in lin for t in (get(layer.weight), get(layer.bias))]
    return _from_projections(*flat, *sizes)


def params_from_ref(ref: nn.Module) -> dict[str, np.ndarray | None]:
    """Our parameters (``PARAM_AXES`` names) from a ``q_proj/k_proj/v_proj/o_proj`` reference.

    Works for :class:`SplitCombineMHA`, :class:`DkDvAttention`,
    :class:`GroupedKVAttention`. Biases are None when the reference has none.
    """
    return _ref_tensors(ref, lambda t: t)


def grads_from_ref(ref: nn.Module) -> dict[str, np.ndarray | None]:
    """The ``.grad`` of a reference's parameters, in our layout (as :func:`params_from_ref`)."""
    return _ref_tensors(ref, lambda t: None if t is None else t.grad)


@torch.no_grad()
def load_ref(ref: nn.Module, params: dict[str, np.ndarray | None]) -> nn.Module:
    """Copies our parameters (arrays in our layout) into a ``q_proj/...`` reference in place."""
    pairs = (("q", ref.q_proj, linear_from_kernel), ("k", ref.k_proj, linear_from_kernel),
             ("v", ref.v_proj, linear_from_kernel), ("o", ref.o_proj, linear_from_out_kernel))
    for name, layer, to_weight in pairs:
        layer.weight.copy_(torch.from_numpy(np.array(to_weight(params[f"{name}_kernel"]))))
        bias = params[f"{name}_bias"]
        if (bias is None) != (layer.bias is None):
            raise ValueError(f"{name}_bias presence differs between module and reference")
        if bias is not None:
            layer.bias.copy_(torch.from_numpy(np.array(bias).reshape(-1)))
    return ref


# ---------------------------------------------------------------------------
# torch.nn.MultiheadAttention
# ---------------------------------------------------------------------------


def _torch_mha_tensors(mha: nn.MultiheadAttention, get) -> dict:
    E, N = mha.embed_dim, mha.num_heads
    if mha.bias_k is not None or mha.add_zero_attn:
        raise ValueError("add_bias_kv / add_zero_attn have no counterpart in our module")
    if mha._qkv_same_embed_dim:
        wq, wk, wv = get(mha.in_proj_weight).chunk(3)
    else:
        wq, wk, wv = get(mha.q_proj_weight), get(mha.k_proj_weight), get(mha.v_proj_weight)
    in_bias = get(mha.in_proj_bias)
    bq, bk, bv = (None, None, None) if in_bias is None else in_bias.chunk(3)
    out = mha.out_proj
    H = E // N
    return _from_projections(wq, bq, wk, bk, wv, bv, get(out.weight), get(out.bias), N, N, H, H)


def params_from_torch_mha(mha: nn.MultiheadAttention) -> dict[str, np.ndarray | None]:
    """Our parameters from ``torch.nn.MultiheadAttention`` (packed or separate in-projections)."""
    return _torch_mha_tensors(mha, lambda t: t)


def grads_from_torch_mha(mha: nn.MultiheadAttention) -> dict[str, np.ndarray | None]:
    """The gradients of ``torch.nn.MultiheadAttention``'s parameters in our layout."""
    return _torch_mha_tensors(mha, lambda t: None if t is None else t.grad)


def mask_from_torch_mha(key_padding_mask: Tensor | None, attn_mask: Tensor | None,
                        ) -> np.ndarray | None:
    """torch's boolean masks (True = blocked) -> our mask (True = attend).

    Args:
      key_padding_mask: ``[B, S]``, True marks padding.
      attn_mask: ``[T, S]``, True marks a forbidden pair.

    Returns:
      ``[B|1, 1, T|1, S]`` boolean, or None when both are None.
    """
    mask = None
    if attn_mask is not None:
        if attn_mask.dtype != torch.bool:
            raise ValueError(f"only boolean attn_mask maps to our mask; got {attn_mask.dtype}")
        mask = ~_np(attn_mask)[None, None]  # [1, 1, T, S]
    if key_padding_mask is not None:
        pad = ~_np(key_padding_mask)[:, None, None, :]  # [B, 1, 1, S]
        mask = pad if mask is None else mask & pad
    return mask


# ---------------------------------------------------------------------------
# Seed 000 layout as block-diagonal kernels
# ---------------------------------------------------------------------------


def _block_diagonal(layers: nn.ModuleList, get) -> np.ndarray:
    """Per-head ``Linear(d, d)`` weights -> ``[N * d, N, d]``; head i fills rows ``i*d:(i+1)*d``."""
    N = len(layers)
    d = layers[0].weight.shape[0]
    kernel = np.zeros((N * d, N, d), np.float32)
    for i, layer in enumerate(layers):
        kernel[i * d:(i + 1) * d, i, :] = _np(get(layer.weight)).T
    return kernel


def _head_split_tensors(ref: HeadSplitMHA, get) -> dict[str, np.ndarray]:
    E, N, d = ref.embed_size, ref.heads, ref.head_dim
    return {
        "q_kernel": _block_diagonal(ref.queries, get),
        "k_kernel": _block_diagonal(ref.keys, get),
        "v_kernel": _block_diagonal(ref.values, get),
        "o_kernel": out_kernel_from_linear(get(ref.fc_out.weight), N, d),
        "q_bias": np.zeros((N, d), np.float32),
        "k_bias": np.zeros((N, d), np.float32),
        "v_bias": np.zeros((N, d), np.float32),
        "o_bias": _np(get(ref.fc_out.bias)).reshape(E),
    }


def head_split_to_params(ref: HeadSplitMHA) -> dict[str, np.ndarray]:
    """Our parameters that reproduce :class:`HeadSplitMHA` exactly.

    ``q/k/v_kernel [E, N, E/N]`` are block diagonal: head i reads only input slice
    ``i*E/N:(i+1)*E/N`` through its own matrix and every other entry is zero. The
    q/k/v biases are zero (our module has ``use_bias`` for all four projections);
    ``o_bias`` is ``fc_out.bias``. Use with
    ``MultiHeadAttention(E, N, scale=1/sqrt(E), use_bias=True)``.
    """
    return _head_split_tensors(ref, lambda t: t)


def head_split_grads(ref: HeadSplitMHA) -> dict[str, np.ndarray]:
    """The reference's gradients laid out as :func:`head_split_to_params`.

    Off-diagonal blocks and the q/k/v biases, which the reference does not have,
    are zero here; compare them separately (our gradient there is not zero).
    """
    return _head_split_tensors(ref, lambda t: t.grad)


def head_split_block_mask(embed_size: int, heads: int) -> np.ndarray:
    """``[E, N, E/N]`` boolean, True on the diagonal blocks of :func:`head_split_to_params`."""
    d = embed_size // heads
    rows = np.arange(embed_size)[:, None, None] // d
    return np.broadcast_to(rows == np.arange(heads)[None, :, None], (embed_size, heads, d))
