"""``python -m refimpl chat`` on a tiny random Qwen2 checkpoint with a toy R1-style tokenizer: the streamed
text is the decoded greedy continuation of the chat-templated prompt, errors are one line with exit 2."""

import io
import json

import numpy as np
import pytest

from refimpl import load_pretrained, load_tokenizer
from refimpl.__main__ import main
from refimpl.chat import stream_tokens
from refimpl.model import save_pretrained
from refimpl.tokenizer import write_toy_tokenizer

from .model.students_helpers import hub_config, random_student

CORPUS = ["What is 2+2? It is 4.", "reasoning here, step by step", "The answer is 42."] * 10


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("student")
    tok = write_toy_tokenizer(path, CORPUS, 280)
    config, params = random_student(hub_config("qwen2", vocab=len(tok) + 4, d=32, h=4, dh=8, layers=2,
                                               max_position_embeddings=128), seed=3)
    save_pretrained(path, params, config, dtype="bfloat16")
    return path


def test_prompt_streams_the_greedy_reply(ckpt, capsys):
    assert main(["chat", str(ckpt), "--prompt", "What is 2+2?", "--temperature", "0", "--max-new-tokens", "12",
                 "--dtype", "float64"]) == 0
    out, err = capsys.readouterr()
    tok, m = load_tokenizer(ckpt), load_pretrained(ckpt)
    ids = tok.apply_chat_template([{"role": "user", "content": "What is 2+2?"}], add_generation_prompt=True)
    gen = m.generate(np.array([ids]), 12, stop_tokens=[tok.eos_token_id])[0, len(ids):]
    gen = gen[:list(gen).index(tok.eos_token_id) + 1] if tok.eos_token_id in gen else gen
    text = tok.decode(gen, skip_special_tokens=True)
    assert list(stream_tokens(m, ids, 12, stop={tok.eos_token_id})) == list(gen)
    assert out.startswith("[thinking]\n")
    shown = out[len("[thinking]\n"):].rstrip("\n")
    if "</think>" in text:
        assert shown == text.replace("</think>", "\n[answer]\n", 1)
    else:
        assert shown == text
    assert "tokens/s]" in err


def test_interactive_loop_keeps_history(ckpt):
    out = io.StringIO()
    from refimpl.chat import chat_main
    assert chat_main([str(ckpt), "--max-new-tokens", "4", "--system", "SYS"], stdin=io.StringIO("hi\nagain\n"),
                     out=out) == 0
    assert out.getvalue().count("you> ") == 3 and out.getvalue().count("[thinking]") == 2


def test_errors_are_one_line(ckpt, tmp_path, capsys):
    assert main(["chat", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no tokenizer.json" in err
    for f in ("tokenizer.json", "config.json", "model.safetensors"):
        (tmp_path / f).write_bytes((ckpt / f).read_bytes())
    cfg = json.loads((ckpt / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({k: v for k, v in cfg.items() if k != "chat_template"}))
    assert main(["chat", str(tmp_path), "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no chat template" in err
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    (tmp_path / "config.json").write_text(json.dumps({**json.loads((ckpt / "config.json").read_text()),
                                                      "model_type": "gpt2"}))
    assert main(["chat", str(tmp_path), "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "model_type must be one of" in err and "gpt2" in err


def test_reasoning_is_set_apart_from_the_answer_and_utf8_waits(ckpt):
    from refimpl.chat import StreamPrinter
    tok = load_tokenizer(ckpt)
    for text in ["step 1</think>\n\nThe answer is 42.", "é日</think>🙂"]:
        out = io.StringIO()
        printer = StreamPrinter(tok, out, thinking=True)
        for i in tok.encode(text, add_special_tokens=False):
            printer.add(i)
            assert "\ufffd" not in out.getvalue()
        before, after = text.split("</think>")
        assert out.getvalue() == f"[thinking]\n{before}\n[answer]\n{after}"
