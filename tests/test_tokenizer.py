"""refimpl.load_tokenizer on a byte-level BPE tokenizer trained in the test with R1-Distill-Qwen's
pipeline and special tokens, and an R1-style chat template: R1's template conventions, round trips on
hypothesis text, and, with transformers installed, the same ids and strings as AutoTokenizer."""

import json
import unicodedata

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from refimpl import load_tokenizer
from refimpl.tokenizer import ASSISTANT, BOS, END_THINK, EOS, THINK, USER, write_toy_tokenizer

CORPUS = ["The quick brown fox jumps over the lazy dog. 12345 numbers!", "What is 2+2? It is 4.\n\nreasoning here",
          "héllo wörld ünïcode 日本語 emoji 🙂", "def f(x):\n    return x * 2  # code\n"] * 10

CHAT = [{"role": "system", "content": "SYS"}, {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "<think>\nreasoning here\n</think>\n\nIt is 4."},
        {"role": "user", "content": "And 3+3?"}]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    write_toy_tokenizer(path, CORPUS, 320)
    return path


@pytest.fixture(scope="module")
def tok(tok_dir):
    return load_tokenizer(tok_dir)


def test_r1_template_conventions(tok):
    text = tok.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
    assert text == (f"{BOS}SYS{USER}What is 2+2?{ASSISTANT}\n\nIt is 4.{EOS}{USER}And 3+3?{ASSISTANT}{THINK}\n")
    assert tok.apply_chat_template(CHAT, tokenize=False).endswith(f"{USER}And 3+3?")
    two_systems = [{"role": "user", "content": "q"}, {"role": "system", "content": "A"},
                   {"role": "system", "content": "B"}]
    assert tok.apply_chat_template(two_systems, tokenize=False) == f"{BOS}B{USER}q"      # the last system wins
    assert tok.apply_chat_template([{"role": "user", "content": "q", "name": None}], tokenize=False) == f"{BOS}{USER}q"
    ids = tok.apply_chat_template(CHAT, add_generation_prompt=True)
    assert ids.count(tok.bos_token_id) == 1 and ids[0] == tok.bos_token_id                 # one BOS
    assert ids[-2:] == [tok.token_to_id(THINK), tok.encode("\n", add_special_tokens=False)[0]]
    assert tok.decode(ids) == text


def test_special_and_added_tokens(tok):
    assert tok.bos_token_id == tok.token_to_id(BOS) and tok.eos_token_id == tok.token_to_id(EOS)
    assert len(tok) == 320 + 6
    ids = tok.encode(f"a{EOS}b{END_THINK}c", add_special_tokens=False)
    assert tok.eos_token_id in ids and tok.token_to_id(END_THINK) in ids                   # matched whole
    seq = [tok.bos_token_id, tok.token_to_id(USER), *tok.encode("hi", False), tok.token_to_id(THINK),
           *tok.encode("x", False), tok.token_to_id(END_THINK), *tok.encode("y", False), tok.eos_token_id]
    assert tok.decode(seq, skip_special_tokens=True) == f"{USER}hi{THINK}x{END_THINK}y"    # <think> is not special
    assert tok.decode(seq) == f"{BOS}{USER}hi{THINK}x{END_THINK}y{EOS}"


@settings(max_examples=60)
@given(text=st.text(max_size=40))
def test_round_trips_on_any_text(tok, text):
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.encode(text) == [tok.bos_token_id] + ids
    assert tok.decode(ids) == unicodedata.normalize("NFC", text)          # NFC normalizer, byte-exact otherwise


def test_errors_are_named(tmp_path, tok_dir):
    with pytest.raises(ValueError, match="no tokenizer.json"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text((tok_dir / "tokenizer.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text("{oops")
    with pytest.raises(ValueError, match="tokenizer_config.json: not valid JSON"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": BOS, "eos_token": EOS}))
    bare = load_tokenizer(tmp_path)
    assert bare.encode("hi")[0] == bare.bos_token_id
    with pytest.raises(ValueError, match="no chat template"):
        bare.apply_chat_template([{"role": "user", "content": "q"}])
    (tmp_path / "chat_template.jinja").write_text("{{ bos_token }}{{ messages[0]['content'] }}")
    assert load_tokenizer(tmp_path).apply_chat_template([{"role": "user", "content": "q"}], tokenize=False) == BOS + "q"
    (tmp_path / "chat_template.jinja").write_text("{{ ''.__class__.__mro__[1].__subclasses__() }}")
    import jinja2
    with pytest.raises(jinja2.exceptions.SecurityError):
        load_tokenizer(tmp_path).apply_chat_template([{"role": "user", "content": "q"}])
    (tmp_path / "chat_template.jinja").write_text("{{ raise_exception('no tools here') }}")
    with pytest.raises(jinja2.exceptions.TemplateError, match="no tools here"):
        load_tokenizer(tmp_path).apply_chat_template([{"role": "user", "content": "q"}])
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(ValueError, match="tokenizer.json: not a valid tokenizers file"):
        load_tokenizer(tmp_path)


# ----------------------------------------------------------------------------------------------
# oracle: transformers' AutoTokenizer on the same files
# ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def hf(tok_dir):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(tok_dir)


def test_same_as_transformers_on_chats(tok, hf):
    assert len(tok) == len(hf) and tok.bos_token_id == hf.bos_token_id and tok.eos_token_id == hf.eos_token_id
    chats = [CHAT, CHAT[1:], CHAT[:2], [{"role": "user", "content": "日本語 🙂"}],
             [*CHAT, {"role": "assistant", "content": "no think tag here"}]]
    for chat in chats:
        for gen in (False, True):
            assert tok.apply_chat_template(chat, add_generation_prompt=gen, tokenize=False) == \
                hf.apply_chat_template(chat, add_generation_prompt=gen, tokenize=False)
            assert tok.apply_chat_template(chat, add_generation_prompt=gen) == \
                hf.apply_chat_template(chat, add_generation_prompt=gen, return_dict=False)


@settings(max_examples=60)
@given(text=st.text(max_size=40), special=st.booleans())
def test_same_as_transformers_on_any_text(tok, hf, text, special):
    ids = tok.encode(text, add_special_tokens=special)
    assert ids == hf.encode(text, add_special_tokens=special)
    assert tok.decode(ids) == hf.decode(ids)
    assert tok.decode(ids, skip_special_tokens=True) == hf.decode(ids, skip_special_tokens=True)
