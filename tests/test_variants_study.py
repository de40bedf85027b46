"""The study's task generators and block patterns (experiments/variants_study.py).

No training here (the study itself measures); these check that the tasks ask
what the study says they ask. Exact integer checks, no tolerance.
"""

import importlib.util
import pathlib
import sys

import jax
import numpy as np
import pytest

from attention_jax import masks

_PATH = pathlib.Path(__file__).resolve().parent.parent / "experiments" / "variants_study.py"
_spec = importlib.util.spec_from_file_location("variants_study", _PATH)
vs = importlib.util.module_from_spec(_spec)
sys.modules["variants_study"] = vs  # dataclasses look their module up
_spec.loader.exec_module(vs)

PAIR_END = vs.KEYS * vs.VALUES  # pair tokens are key * VALUES + value


def _check_answers(tokens, targets, weights):
    """Every scored position holds a query whose paired value is the target."""
    for t, y, w in zip(tokens, targets, weights, strict=True):
        pairs = {int(p) // vs.VALUES: int(p) % vs.VALUES for p in t if p < PAIR_END}
        assert len(pairs) == vs.PAIRS  # distinct keys: one right answer
        qpos = np.flatnonzero(w)
        assert len(qpos) == vs.PAIRS
        for q in qpos:
            key = int(t[q]) - PAIR_END
            assert 0 <= key < vs.KEYS and pairs[key] == y[q]
    return qpos


@pytest.mark.parametrize("T", [256, 512])
def test_recall_queries_sit_at_the_end_and_pairs_in_the_first_half(T):
    tokens, targets, weights = map(np.asarray, vs.recall_batch(jax.random.key(0), 3, T))
    qpos = _check_answers(tokens, targets, weights)
    assert list(qpos) == list(range(T - vs.PAIRS, T))
    assert all((np.flatnonzero(t < PAIR_END) < T // 2).all() for t in tokens)


def test_local_queries_follow_their_pair_within_the_gap():
    tokens, targets, weights = map(np.asarray, vs.local_batch(jax.random.key(1), 4, 512))
    _check_answers(tokens, targets, weights)
    for t, w in zip(tokens, weights, strict=True):
        pair_pos = np.flatnonzero(t < PAIR_END)
        for q in np.flatnonzero(w):
            key = int(t[q]) - PAIR_END
            p = next(i for i in pair_pos if int(t[i]) // vs.VALUES == key)
            assert 1 <= q - p <= vs.GAP


@pytest.mark.skipif(not hasattr(masks, "BlockSparse"), reason="needs masks.BlockSparse")
def test_block_patterns_are_sparse_reproducible_and_per_head():
    T = 2048
    for name in ("window", "random", "bigbird"):
        a, b = vs.block_pattern(name, T), vs.block_pattern(name, T)
        np.testing.assert_array_equal(a.array, b.array)  # from a seed: reproducible
        assert 0 < vs.density(a, T) < 0.5
    rnd = vs.block_pattern("random", T).array
    assert rnd.shape[0] == vs.N and not (rnd[0] == rnd[1]).all()  # heads draw their own
    assert (rnd.sum(-1) == 2).all()  # 2 key blocks per query block and head
