"""Character tokenizer: round trips, single-token tags, padding, errors."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from refimpl.tasks import TOKENIZER, CharTokenizer, pad_sequences
from refimpl.tasks.tokenizer import DEFAULT_ALPHABET, TAG_TOKENS

# text over the alphabet, with tags and near-tags ("<thin", "<pad>") mixed in
pieces = st.sampled_from(list(DEFAULT_ALPHABET) + list(TAG_TOKENS) + ["<pad>", "<eos>", "<thin", "</answ", "<<"])
texts = st.lists(pieces, max_size=30).map("".join)


@given(text=texts, bos=st.booleans(), eos=st.booleans())
def test_round_trip(text, bos, eos):
    ids = TOKENIZER.encode(text, add_bos=bos, add_eos=eos)
    assert ids.dtype == np.int64
    assert TOKENIZER.decode(ids) == text
    assert not bos or ids[0] == TOKENIZER.bos_id
    assert not eos or ids[-1] == TOKENIZER.eos_id
    assert np.count_nonzero(ids < 3) == bos + eos          # control tokens only when asked for


def test_tags_are_single_tokens_and_control_tokens_are_never_parsed():
    tk = TOKENIZER
    ids = tk.encode("<think>1+1</think><answer>2</answer>")
    assert ids.tolist() == [tk.think_id, *tk.encode("1+1").tolist(), tk.end_think_id, tk.answer_id,
                            *tk.encode("2").tolist(), tk.end_answer_id]
    assert len(tk.encode("<pad>")) == 5
    assert tk.decode(np.array([tk.bos_id, 7, tk.eos_id, tk.pad_id]), skip_special_tokens=False) == \
        "<bos>" + tk.vocab[7] + "<eos><pad>"
    assert tk.vocab_size == 7 + len(DEFAULT_ALPHABET)


def test_batch_padding_sides():
    ids, mask = TOKENIZER.encode_batch(["12", "3"], side="left", add_bos=True)
    assert ids.shape == (2, 3) and mask.tolist() == [[True] * 3, [False, True, True]]
    assert ids[1, 0] == TOKENIZER.pad_id
    ids, mask = TOKENIZER.encode_batch(["12", "3"], side="right", length=4)
    assert mask.tolist() == [[True, True, False, False], [True, False, False, False]]
    assert TOKENIZER.decode_batch(ids, mask) == ["12", "3"]
    assert TOKENIZER.decode_batch(ids) == ["12", "3"]


def test_errors():
    with pytest.raises(ValueError, match="text: character 'Q'"):
        TOKENIZER.encode("1Q")
    with pytest.raises(TypeError, match="text"):
        TOKENIZER.encode(b"12")
    with pytest.raises(ValueError, match="ids: expected values"):
        TOKENIZER.decode(np.array([0, 999]))
    with pytest.raises(TypeError, match="ids"):
        TOKENIZER.decode(np.array([[1, 2]]))
    with pytest.raises(ValueError, match="alphabet"):
        CharTokenizer("aab")
    with pytest.raises(ValueError, match="side"):
        TOKENIZER.encode_batch(["1"], side="middle")
    with pytest.raises(ValueError, match="length"):
        pad_sequences([np.array([1, 2, 3])], length=2)
    with pytest.raises(ValueError, match="mask"):
        TOKENIZER.decode_batch(np.zeros((2, 3), np.int64), np.ones((2, 2), bool))


@pytest.mark.parametrize("kwargs, err, match", [
    (dict(seqs=[[1, 2], [[3]]]), ValueError, r"seqs\[1\]"),
    (dict(seqs=[[1.5, 2.0]]), ValueError, r"seqs\[0\]"),
    (dict(seqs="abc"), TypeError, "seqs"),
    (dict(seqs=[[1]], side="middle"), ValueError, "side"),
    (dict(seqs=[[1]], pad_id=0.5), TypeError, "pad_id"),
    (dict(seqs=[[1]], length=-1), ValueError, "length"),
    (dict(seqs=[[1, 2, 3]], length=2), ValueError, "length"),
])
def test_pad_sequences_rejects_bad_input(kwargs, err, match):
    seqs = kwargs.pop("seqs")
    with pytest.raises(err, match=match):
        pad_sequences(seqs, **kwargs)
