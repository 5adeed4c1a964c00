"""A character tokenizer for the toy reasoning tasks: one id per character, one per tag.

Tiny policies learn faster when the vocabulary is tiny and every reasoning tag is a single token,
so ``<think>``, ``</think>``, ``<answer>`` and ``</answer>`` are tokens of their own and every other
character is one token. The control tokens ``<pad>``, ``<bos>`` and ``<eos>`` are only ever added
by the tokenizer (``add_bos``/``add_eos``, padding), never parsed from text, so any string over the
alphabet survives ``decode(encode(text)) == text``, including one that spells ``<pad>``.
"""

from __future__ import annotations

import numpy as np

from .._validate import check_choice, check_integer

CONTROL_TOKENS = ("<pad>", "<bos>", "<eos>")
TAG_TOKENS = ("<think>", "</think>", "<answer>", "</answer>")
DEFAULT_ALPHABET = "0123456789abcdefghijklmnopqrstuvwxyz +-*=,.:;|?!()[]<>/\n"


class CharTokenizer:
    """Character-level tokenizer with single-token reasoning tags.

    Ids: 0 ``<pad>``, 1 ``<bos>``, 2 ``<eos>``, 3–6 the tags, then one id per alphabet character.

    Parameters
    ----------
    alphabet : str
        The characters that can be encoded (no duplicates).
    """

    def __init__(self, alphabet: str = DEFAULT_ALPHABET):
        if not isinstance(alphabet, str) or not alphabet or len(set(alphabet)) != len(alphabet):
            raise ValueError(f"alphabet: expected a non-empty str without repeated characters, got {alphabet!r}")
        self.alphabet = alphabet
        self.vocab = CONTROL_TOKENS + TAG_TOKENS + tuple(alphabet)
        self._id = {tok: i for i, tok in enumerate(self.vocab)}
        self.pad_id, self.bos_id, self.eos_id = 0, 1, 2
        self.think_id, self.end_think_id, self.answer_id, self.end_answer_id = 3, 4, 5, 6

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def __repr__(self) -> str:
        return f"CharTokenizer(vocab_size={self.vocab_size}, alphabet={self.alphabet!r})"

    def encode(self, text: str, *, add_bos=False, add_eos=False) -> np.ndarray:
        """Ids of ``text`` (tags as single ids). Shapes: str -> (L,) int64."""
        if not isinstance(text, str):
            raise TypeError(f"text: expected a str, got {type(text).__name__}")
        ids = [self.bos_id] if add_bos else []
        i = 0
        while i < len(text):
            if text[i] == "<":
                tag = next((t for t in TAG_TOKENS if text.startswith(t, i)), None)
                if tag is not None:
                    ids.append(self._id[tag])
                    i += len(tag)
                    continue
            if text[i] not in self._id:
                raise ValueError(f"text: character {text[i]!r} at position {i} is not in the alphabet")
            ids.append(self._id[text[i]])
            i += 1
        if add_eos:
            ids.append(self.eos_id)
        return np.array(ids, dtype=np.int64)

    def decode(self, ids, *, skip_special_tokens=True) -> str:
        """Text of ``ids``; ``<pad>``/``<bos>``/``<eos>`` are dropped unless ``skip_special_tokens=False``.

        Tags always decode to their text. Shapes: (L,) int -> str.
        """
        ids = np.asarray(ids)
        if ids.ndim != 1 or (ids.size and not np.issubdtype(ids.dtype, np.integer)):
            raise TypeError(f"ids: expected a 1-D integer array, got dtype {ids.dtype}, shape {ids.shape}")
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise ValueError(f"ids: expected values in [0, {self.vocab_size}), got [{ids.min()}, {ids.max()}]")
        skip = 3 if skip_special_tokens else 0
        return "".join(self.vocab[i] for i in ids.tolist() if i >= skip)

    def encode_batch(self, texts, *, add_bos=False, add_eos=False, side="right", length=None):
        """Encode and pad to a rectangle.

        ``side="left"`` pads prompts (so generation continues at the right edge, as TRL requires),
        ``"right"`` pads completions. ``length`` fixes the width (default: the longest).

        Shapes: list[str] (B) -> ids (B, L) int64, mask (B, L) bool (True on real tokens).
        """
        if side not in ("left", "right"):
            raise ValueError(f"side: expected 'left' or 'right', got {side!r}")
        seqs = [self.encode(t, add_bos=add_bos, add_eos=add_eos) for t in texts]
        return pad_sequences(seqs, pad_id=self.pad_id, side=side, length=length)

    def decode_batch(self, ids, mask=None, *, skip_special_tokens=True) -> list[str]:
        """Decode each row of ``ids`` (B, L), keeping only positions where ``mask`` is True."""
        ids = np.asarray(ids)
        if ids.ndim != 2:
            raise ValueError(f"ids: expected shape (B, L), got {ids.shape}")
        if mask is not None and np.shape(mask) != ids.shape:
            raise ValueError(f"mask: expected shape {ids.shape} to match ids, got {np.shape(mask)}")
        rows = ids if mask is None else [r[np.asarray(m, bool)] for r, m in zip(ids, mask, strict=True)]
        return [self.decode(r, skip_special_tokens=skip_special_tokens) for r in rows]


def pad_sequences(seqs, *, pad_id=0, side="right", length=None):
    """Stack 1-D int sequences into (B, L) ids and a (B, L) bool mask, padding with ``pad_id``."""
    check_choice("side", side, ("left", "right"))
    check_integer("pad_id", pad_id)
    if isinstance(seqs, str | bytes) or not hasattr(seqs, "__len__"):
        raise TypeError(f"seqs: expected a list of 1-D integer sequences, got {type(seqs).__name__}")
    seqs = [np.asarray(s) for s in seqs]
    for i, s in enumerate(seqs):
        if s.ndim != 1 or (s.size and s.dtype.kind not in "iu"):
            raise ValueError(f"seqs[{i}]: expected a 1-D integer sequence, got shape {s.shape} dtype {s.dtype}")
    width = max((len(s) for s in seqs), default=0) if length is None else check_integer("length", length, low=0)
    if any(len(s) > width for s in seqs):
        raise ValueError(f"length: {width} is shorter than the longest sequence ({max(len(s) for s in seqs)})")
    ids = np.full((len(seqs), width), pad_id, dtype=np.int64)           # (B, L)
    mask = np.zeros((len(seqs), width), dtype=bool)                     # (B, L)
    for i, s in enumerate(seqs):
        sl = slice(width - len(s), width) if side == "left" else slice(0, len(s))
        ids[i, sl], mask[i, sl] = s, True
    return ids, mask


TOKENIZER = CharTokenizer()
