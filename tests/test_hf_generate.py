"""The example decoder experiments/hf_generate.py against transformers, for every family of
its DECODER_FAMILIES (tiny random models built in code, nothing downloaded): the prefill
logits of a left-padded batch of two prompts of different lengths equal the causal LM's
forward at the valid tokens (float32), and greedy generation with our KVCache (prefill, then
one-token steps) gives transformers' ``generate(do_sample=False)`` tokens, token by token.
Prompts are longer than the sliding windows (4), so windows cut keys in prefill and steps."""

import importlib.util
import json
import pathlib
import sys

import numpy as np
import pytest

tf = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

_SCRIPT = pathlib.Path(__file__).resolve().parent.parent / "experiments" / "hf_generate.py"
_spec = importlib.util.spec_from_file_location("experiments_hf_generate", _SCRIPT)
gen = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = gen  # its dataclass looks its module up there
_spec.loader.exec_module(gen)

LOGITS_ATOL = 1e-4  # logits are O(1..10); float32 through 2 layers and the head
NEW = 8  # greedy tokens per row
PROMPTS = [[11, 42, 7, 93, 5, 60, 18], [3, 77, 25, 50]]  # lengths 7 and 4: left padding 3


@pytest.fixture(scope="module", params=gen.DECODER_FAMILIES)
def family_model(request):
    model = gen.tiny_model(request.param)
    return request.param, model, gen.load_decoder(model)


def test_prefill_logits_equal_the_causal_lm(family_model):
    family, model, (spec, weights) = family_model
    ids, mask = gen.left_pad(PROMPTS)
    assert mask.tolist()[1] == [0, 0, 0, 1, 1, 1, 1]
    with torch.no_grad():
        want = model(torch.as_tensor(ids, dtype=torch.long),
                     attention_mask=torch.as_tensor(mask)).logits.numpy()  # [B, T, V]
    got, _, ends = gen.prefill_logits(spec, weights, ids, mask)
    assert ends.tolist() == [7, 7]
    valid = mask == 1  # the logits of padding slots are garbage on both sides
    got = np.asarray(got)
    np.testing.assert_allclose(got[valid], want[valid], atol=LOGITS_ATOL, rtol=0, err_msg=family)
    worst = float(np.abs(got[valid] - want[valid]).max())
    print(f"\n{family}: prefill logits max abs error vs transformers {worst:.2e}")


def test_greedy_tokens_equal_transformers_generate(family_model):
    family, model, (spec, weights) = family_model
    ids, mask = gen.left_pad(PROMPTS)
    ours = gen.generate_padded(spec, weights, ids, mask, NEW)
    theirs = gen.hf_generate(model, ids, mask, NEW)
    assert ours.shape == theirs.shape == (2, NEW)
    np.testing.assert_array_equal(ours, theirs, err_msg=family)
    # not a degenerate model that repeats one token whatever attention does
    assert all(len(set(row.tolist())) >= 2 for row in ours), ours.tolist()
    print(f"\n{family}: greedy tokens equal transformers' (left-padded batch of 2): "
          f"{ours.tolist()}")


def test_right_padding_gives_the_same_tokens(family_model):
    _, _, (spec, weights) = family_model
    left = gen.generate_padded(spec, weights, *gen.left_pad(PROMPTS), NEW)
    ids, mask = gen.left_pad(PROMPTS)
    right_ids = np.array([np.roll(i, -int((m == 0).sum())) for i, m in zip(ids, mask, strict=True)])
    right_mask = np.array([np.roll(m, -int((m == 0).sum())) for m in mask])
    assert right_mask.tolist()[1] == [1, 1, 1, 1, 0, 0, 0]
    np.testing.assert_array_equal(
        gen.generate_padded(spec, weights, right_ids, right_mask, NEW), left)


def test_padding_runs_and_refusals():
    starts, ends = gen.padding(np.array([[0, 0, 1, 1], [1, 1, 1, 0], [1, 1, 1, 1]]))
    assert starts.tolist() == [2, 0, 0] and ends.tolist() == [4, 3, 4]
    with pytest.raises(ValueError, match=r"attention_mask row 0 must hold one run of real"):
        gen.padding(np.array([[1, 0, 1]]))
    with pytest.raises(ValueError, match=r"attention_mask row 1 must hold one run"):
        gen.padding(np.array([[1, 1], [0, 0]]))
    with pytest.raises(ValueError, match=r"every prompt needs a token"):
        gen.left_pad([[1], []])


def test_unsupported_family_is_named():
    model = tf.GPT2LMHeadModel(tf.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=11))
    with pytest.raises(ValueError, match=r"model_type 'gpt2': the example decoder covers"):
        gen.load_decoder(model)
    with pytest.raises(ValueError, match=r"mlp_bias=True \(biases on the MLP projections\)"):
        gen.load_decoder(gen.tiny_model("llama", mlp_bias=True))
    with pytest.raises(ValueError, match=r"hidden activation 'relu' is not supported"):
        gen.load_decoder(gen.tiny_model("mistral", hidden_act="relu"))


def test_main_on_a_local_checkpoint(tmp_path, capsys):
    gen.tiny_model("qwen3").save_pretrained(tmp_path)  # no tokenizer: prompts as --ids
    argv = ["--model", str(tmp_path), "--ids", "11,42,7,93,5", "--ids", "3,77",
            "--max-new-tokens", "4", "--check"]
    assert gen.main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["family"] == "qwen3" and report["layers"] == 2 and report["equal"] is True
    assert report["tokens"] == report["transformers"]
    assert np.asarray(report["tokens"]).shape == (2, 4)
