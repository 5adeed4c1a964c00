r"""``python -m refimpl chat PATH``: talk to an R1-Distill checkpoint (or any checkpoint refimpl loads).

The prompt goes through the checkpoint's own chat template (:func:`refimpl.load_tokenizer`), so an
R1-Distill student starts its reply inside ``<think>`` (the template's generation prompt ends with
``<think>\n``); the reasoning is printed under a ``thinking`` marker and the answer, after
``</think>``, under an ``answer`` marker. Tokens are decoded and printed as they arrive (a
byte-level BPE token can end in the middle of a UTF-8 character, so text is printed only up to the
last complete character), generation stops at EOS, and the speed in tokens/s is printed at the end.
Without ``--prompt`` it is an interactive loop that keeps the conversation (the template strips
earlier reasoning, as R1's does). Missing tokenizer files, a tokenizer without a chat template, or an
unsupported architecture give one line on stderr and exit status 2.

DeepSeek's usage recommendations for the R1 models: temperature 0.6, top-p 0.95, no system prompt.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


def stream_tokens(model, prompt_ids, max_new_tokens, *, temperature=0.0, top_p=1.0, rng=None, stop=()):
    """Yield generated token ids one at a time: one prefill, then one cached decode step per token
    (the same computation as :func:`refimpl.model.generate.generate`, token by token). Stops after a
    token in ``stop`` (which is yielded) or ``max_new_tokens`` tokens."""
    from .model.generate import sample_next
    from .model.transformer import init_caches, model_infer
    ids = np.asarray(prompt_ids, dtype=np.int64)[None]                   # (1, T)
    t = ids.shape[1]
    n = min(max_new_tokens, model.config.max_position_embeddings - t)
    if n <= 0:
        return
    caches = init_caches(model.config, 1, t + n, model.params["lm_head"].dtype)
    logits, _ = model_infer(ids, model.params, model.config, caches, 0)  # (1, T, V)
    for step in range(n):
        tok = int(sample_next(logits[:, -1], temperature=temperature, top_p=top_p, rng=rng)[0])
        yield tok
        if tok in stop or step == n - 1:
            return
        logits, _ = model_infer(np.array([[tok]]), model.params, model.config, caches, t + step)  # (1, 1, V)


class StreamPrinter:
    """Prints the decoded text incrementally, with the reasoning set apart from the answer."""

    def __init__(self, tok, out, thinking):
        self.tok, self.out, self.ids, self.shown, self.thinking = tok, out, [], "", thinking
        if thinking:
            out.write("[thinking]\n")

    def add(self, token_id):
        self.ids.append(token_id)
        text = self.tok.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):                    # an incomplete UTF-8 character: wait for its rest
            return
        old, self.shown = self.shown, text
        if self.thinking and THINK_CLOSE in text:       # the reasoning ends: set the answer apart
            cut = text.index(THINK_CLOSE)
            self.out.write(text[len(old):cut] + "\n[answer]\n" + text[max(cut + len(THINK_CLOSE), len(old)):])
            self.thinking = False
        else:
            self.out.write(text[len(old):])
        self.out.flush()


def _reply(model, tok, messages, args, rng, out):
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = tok.encode(prompt, add_special_tokens=False)
    printer = StreamPrinter(tok, out, thinking=prompt.rstrip().endswith(THINK_OPEN))
    stop = {tok.eos_token_id} - {None}
    start = time.perf_counter()
    for t in stream_tokens(model, ids, args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                           rng=rng, stop=stop):
        printer.add(t)
    seconds = time.perf_counter() - start
    out.write("\n")
    n = len(printer.ids)
    print(f"[{n} tokens in {seconds:.2f} s, {n / max(seconds, 1e-9):.1f} tokens/s]", file=sys.stderr)
    text = tok.decode(printer.ids, skip_special_tokens=True)
    return (THINK_OPEN + "\n" + text) if printer.ids and prompt.rstrip().endswith(THINK_OPEN) else text


def chat_main(argv, stdin=None, out=None):
    """Entry point of ``python -m refimpl chat``; returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m refimpl chat", description=__doc__.splitlines()[0])
    parser.add_argument("path", help="checkpoint directory (config.json, *.safetensors, tokenizer.json)")
    parser.add_argument("--prompt", help="one prompt; without it, an interactive loop")
    parser.add_argument("--system", help="system prompt (DeepSeek recommends none for R1)")
    parser.add_argument("--max-new-tokens", type=int, default=1024)
    parser.add_argument("--temperature", type=float, default=0.6)
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    args = parser.parse_args(argv)
    stdin, out = stdin or sys.stdin, out or sys.stdout
    from . import load_pretrained, load_tokenizer
    try:
        tok = load_tokenizer(args.path)
        if not tok.chat_template:
            raise ValueError(f"{args.path}: the tokenizer has no chat template (tokenizer_config.json "
                             "'chat_template' or chat_template.jinja)")
        if args.max_new_tokens < 1 or args.temperature < 0 or not 0 < args.top_p <= 1:
            raise ValueError("options: expected --max-new-tokens >= 1, --temperature >= 0, 0 < --top-p <= 1")
        model = load_pretrained(args.path, dtype=np.dtype(args.dtype))
    except (ValueError, OSError) as e:
        print(f"refimpl chat: error: {e}", file=sys.stderr)
        return 2
    rng = np.random.default_rng(args.seed)
    history = [{"role": "system", "content": args.system}] if args.system else []
    if args.prompt is not None:
        _reply(model, tok, history + [{"role": "user", "content": args.prompt}], args, rng, out)
        return 0
    while True:
        out.write("you> ")
        out.flush()
        line = stdin.readline()
        if not line or line.strip() in ("exit", "quit"):
            return 0
        history.append({"role": "user", "content": line.rstrip("\n")})
        history.append({"role": "assistant", "content": _reply(model, tok, history, args, rng, out)})
