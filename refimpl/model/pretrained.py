"""The user-facing model object: :class:`Model` wraps ``(config, params)``, :func:`load_pretrained` makes one.

Everything else in refimpl is a pure function of ``(params, config, ...)``; this is the one class at
the user-facing edge (DESIGN: classes only there). It lives apart from :mod:`.generate` and
:mod:`.checkpoint`, which it uses both: loading returns a Model and a Model saves itself, and keeping
either half in the other module made the two import each other.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .checkpoint import from_hub, read_config, save_pretrained
from .generate import generate
from .shards import read_checkpoint
from .transformer import model_forward


class Model:
    """A thin user-facing wrapper of ``(config, params)``; all state is in those two attributes.

    ``m(input_ids)`` -> float64 logits (B, T, V); ``m.generate(input_ids, max_new_tokens=n, ...)``
    (see :func:`refimpl.model.generate.generate`); ``m.save_pretrained(path)`` writes the hub layout.
    """

    def __init__(self, config, params):
        self.config, self.params = config, params

    def __repr__(self):
        c = self.config
        return (f"Model({c.extra.get('model_type', 'deepseek_v3')}, layers={c.num_hidden_layers}, "
                f"hidden={c.hidden_size}, experts={c.n_routed_experts}, mtp={len(self.params.get('mtp', []))})")

    def __call__(self, input_ids, positions=None):
        return model_forward(input_ids, self.params, self.config, positions)[0].astype(np.float64)

    def generate(self, input_ids, max_new_tokens=16, **kwargs):
        return generate(self.params, self.config, input_ids, max_new_tokens, **kwargs)

    def save_pretrained(self, path):
        save_pretrained(path, self.params, self.config)


def load_pretrained(path, dtype=np.float64):
    """Load a hub-layout directory (DeepSeek-V2/V3, or an R1-Distill Qwen2/Llama student; one file or
    sharded) into a :class:`Model` in ``dtype`` (float64 by default, or float32). Tensors are read one
    at a time straight into ``dtype``, so memory holds each weight once."""
    dtype = np.dtype(dtype)
    if dtype not in (np.float32, np.float64):
        raise ValueError(f"dtype: expected float32 or float64, got {dtype}")
    config = read_config(path)
    try:
        return Model(config, from_hub(read_checkpoint(Path(path)), config, dtype))
    except ValueError as e:             # name the directory too (a missing tensor is in no file)
        raise ValueError(f"{os.fspath(path)}: {e}") from None
