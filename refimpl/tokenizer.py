r"""The hub tokenizer of an R1-Distill checkpoint: byte-level BPE, special tokens and the ``<think>`` chat template.

DeepSeek-R1's students ship ``tokenizer.json`` (a Hugging Face ``tokenizers`` pipeline: NFC, a split
regex, byte-level BPE, a post-processor that prepends ``<｜begin▁of▁sentence｜>``) and
``tokenizer_config.json`` (BOS/EOS names and a Jinja chat template). :func:`load_tokenizer` runs that
pipeline with the ``tokenizers`` library and renders the template in a sandboxed ``jinja2``
environment configured as transformers 5.24 configures it (``trim_blocks``, ``lstrip_blocks``,
``loopcontrols``, a ``tojson`` without HTML escaping, ``raise_exception``, ``strftime_now``; message
keys whose value is ``None`` dropped), so :class:`HubTokenizer` gives the ids and strings
transformers' ``AutoTokenizer`` gives on the same files. The template's own ``bos_token`` is the only
BOS of a chat: the rendered text is encoded with ``add_special_tokens=False``.

R1's template conventions (DeepSeek-R1 README, usage recommendations): the system prompt goes right
after BOS; turns are ``<｜User｜>...`` and ``<｜Assistant｜>...<｜end▁of▁sentence｜>`` with no
separators; earlier assistant turns keep only the text after their last ``</think>``; the generation
prompt is ``<｜Assistant｜><think>\n``, so the model starts inside its reasoning.
:data:`R1_CHAT_TEMPLATE` is a template with these conventions (without the hub file's tool-call
branches), used by :func:`write_toy_tokenizer` for tests and the book. The character tokenizer of
:mod:`refimpl.tasks` stays for the toy tasks.
"""

from __future__ import annotations

import json
import os
from datetime import datetime
from pathlib import Path

BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
USER, ASSISTANT, THINK, END_THINK = "<｜User｜>", "<｜Assistant｜>", "<think>", "</think>"

#: A chat template with R1's conventions (system prompt after BOS, ``</think>`` stripping of earlier
#: answers, generation prompt ``<｜Assistant｜><think>\n``); the hub file's tool-call branches omitted.
R1_CHAT_TEMPLATE = (
    "{%- set ns = namespace(system_prompt='') -%}"
    "{%- for message in messages -%}{%- if message['role'] == 'system' -%}"
    "{%- set ns.system_prompt = message['content'] -%}{%- endif -%}{%- endfor -%}"
    "{{- bos_token -}}{{- ns.system_prompt -}}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}{{- '" + USER + "' + message['content'] -}}"
    "{%- elif message['role'] == 'assistant' -%}{%- set content = message['content'] -%}"
    "{%- if '</think>' in content -%}{%- set content = content.split('</think>')[-1] -%}{%- endif -%}"
    "{{- '" + ASSISTANT + "' + content + '" + EOS + "' -}}"
    "{%- endif -%}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '" + ASSISTANT + "<think>\\n' -}}{%- endif -%}"
)

#: Qwen2's pre-tokenizer split (digits one by one); Llama 3 differs only in ``\p{N}{1,3}``.
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
               r"\s*[\r\n]+|\s+(?!\S)|\s+")


def _token_text(tok):
    """A token as tokenizer_config.json writes it: a string, or an AddedToken dict with ``content``."""
    if isinstance(tok, dict):
        return tok.get("content")
    return tok


def _sandbox():
    import jinja2
    from jinja2 import nodes
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(Extension):
        """``{% generation %}...{% endgeneration %}`` renders its body (transformers tracks it for masks)."""
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.Scope(body, lineno=lineno)

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[Generation, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda fmt: datetime.now().strftime(fmt))
    return env


class HubTokenizer:
    """A hub tokenizer (see the module docstring). ``len(tok)`` counts the added tokens too."""

    def __init__(self, tokenizer, config=None, chat_template=None, path=None):
        self.tokenizer, self.config, self.path = tokenizer, dict(config or {}), path
        self.chat_template = chat_template
        self.bos_token = _token_text(self.config.get("bos_token"))
        self.eos_token = _token_text(self.config.get("eos_token"))
        self.pad_token = _token_text(self.config.get("pad_token"))
        self.unk_token = _token_text(self.config.get("unk_token"))
        self._template = None

    def __repr__(self):
        return f"HubTokenizer({len(self)} tokens, bos={self.bos_token!r}, eos={self.eos_token!r})"

    def __len__(self):
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token):
        return None if token is None else self.tokenizer.token_to_id(token)

    @property
    def bos_token_id(self):
        return self.token_to_id(self.bos_token)

    @property
    def eos_token_id(self):
        return self.token_to_id(self.eos_token)

    def encode(self, text, add_special_tokens=True):
        """Token ids of ``text``; the post-processor of tokenizer.json adds BOS if it is configured to."""
        if not isinstance(text, str):
            raise TypeError(f"text: expected a str, got {type(text).__name__}")
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids, skip_special_tokens=False):
        """The text of ``ids`` (byte-exact; ``skip_special_tokens`` drops only tokens flagged special)."""
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def render_chat(self, messages, add_generation_prompt=False, **kwargs):
        """The chat template rendered as a string (transformers' ``apply_chat_template(tokenize=False)``)."""
        if not self.chat_template:
            raise ValueError(f"tokenizer: no chat template in {self.path or 'this tokenizer'} "
                             "(tokenizer_config.json has no 'chat_template' and there is no chat_template.jinja)")
        if not isinstance(messages, list | tuple) or not all(isinstance(m, dict) for m in messages):
            raise ValueError("messages: expected a list of {'role': ..., 'content': ...} dicts")
        if self._template is None:
            self._template = _sandbox().from_string(self.chat_template)
        special = {k: v for k, v in (("bos_token", self.bos_token), ("eos_token", self.eos_token),
                                     ("pad_token", self.pad_token), ("unk_token", self.unk_token)) if v is not None}
        msgs = [{k: v for k, v in m.items() if v is not None} for m in messages]
        return self._template.render(**{"messages": msgs, "tools": None, "documents": None,
                                        "add_generation_prompt": add_generation_prompt, **special, **kwargs})

    def apply_chat_template(self, messages, add_generation_prompt=False, tokenize=True, **kwargs):
        """Ids of the rendered chat (encoded without added special tokens), or the string if not ``tokenize``."""
        text = self.render_chat(messages, add_generation_prompt=add_generation_prompt, **kwargs)
        return self.encode(text, add_special_tokens=False) if tokenize else text


def load_tokenizer(path):
    """The hub tokenizer in directory ``path`` (``tokenizer.json``, optional ``tokenizer_config.json``
    and ``chat_template.jinja``, which transformers >= 4.43 writes and prefers). ``ValueError`` naming
    the file when one is missing or not valid JSON."""
    from tokenizers import Tokenizer
    path = Path(path)
    tj = path / "tokenizer.json"
    if not tj.is_file():
        raise ValueError(f"path: no tokenizer.json in {os.fspath(path)!r} (a hub tokenizer needs it)")
    try:
        tok = Tokenizer.from_file(str(tj))
    except Exception as e:                               # the Rust library raises its own exception type
        raise ValueError(f"{tj}: not a valid tokenizers file ({e})") from None
    config = {}
    if (path / "tokenizer_config.json").is_file():
        try:
            config = json.loads((path / "tokenizer_config.json").read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path / 'tokenizer_config.json'}: not valid JSON ({e})") from None
        if not isinstance(config, dict):
            raise ValueError(f"{path / 'tokenizer_config.json'}: expected a JSON object")
    template = config.get("chat_template")
    if isinstance(template, list):                       # named templates: the default one
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    if (path / "chat_template.jinja").is_file():
        template = (path / "chat_template.jinja").read_text(encoding="utf-8")
    return HubTokenizer(tok, config, template, path)


def write_toy_tokenizer(path, corpus, vocab_size=300, *, chat_template=R1_CHAT_TEMPLATE):
    """Train a small byte-level BPE tokenizer with R1-Distill-Qwen's pipeline and special tokens
    (NFC, Qwen2's split regex, ByteLevel, BOS post-processor; ``<｜begin▁of▁sentence｜>`` and
    ``<｜end▁of▁sentence｜>`` special, ``<｜User｜>``, ``<｜Assistant｜>``, ``<think>``, ``</think>`` added
    but not special, as on the hub) and write ``tokenizer.json`` + ``tokenizer_config.json`` to ``path``.
    For tests and the book: no download. Returns the :class:`HubTokenizer`."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from tokenizers.trainers import BpeTrainer

    from .fileio import atomic_write
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                         show_progress=False)
    tok.train_from_iterator(list(corpus), trainer)
    tok.add_special_tokens([AddedToken(EOS, special=True, normalized=False),
                            AddedToken(BOS, special=True, normalized=False)])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in (USER, ASSISTANT, THINK, END_THINK)])
    bos = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B",
                                                       special_tokens=[(BOS, bos)])
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    with atomic_write(path / "tokenizer.json", "w") as f:
        f.write(tok.to_str())
    config = {"bos_token": BOS, "eos_token": EOS, "pad_token": EOS, "unk_token": None,
              "clean_up_tokenization_spaces": False, "model_max_length": 16384,
              "tokenizer_class": "PreTrainedTokenizerFast", "chat_template": chat_template}
    with atomic_write(path / "tokenizer_config.json", "w") as f:
        json.dump(config, f, ensure_ascii=False, indent=2)
    return load_tokenizer(path)
