"""refimpl: a NumPy reference implementation and executable textbook of DeepSeek-V2/V3/R1.

Every forward pass has a hand-written backward pass, float64 is the reference precision, hot loops
have Numba twins (:mod:`refimpl.backend`), and :mod:`refimpl.testing` gives the gradient checker
and hypothesis strategies to use refimpl as a numerical oracle in other projects' tests.

Notation (shared by the code's shape comments and the book)::

    B   batch                      T   sequence length
    D   hidden size                H   attention heads
    Dh  head dim                   Dn / Dr   nope / rope head dims (qk_nope_head_dim, qk_rope_head_dim)
    Dv  value head dim             Dc  KV latent (kv_lora_rank)
    Dq  query latent (q_lora_rank) E   routed experts   Es  shared experts
    K   experts per token          G   expert groups, or GRPO group size (each use names which)
    V   vocabulary                 N   flattened rows (B*T) where a function flattens them
    I   FFN / expert intermediate size

Importing refimpl is cheap: it loads NumPy and the pure-Python modules only; numba is imported and
kernels compiled on first use.
"""

import importlib

from . import core
from .backend import resolve_backend
from .config import PRESETS, ModelConfig

__version__ = "0.1.0"

# Submodules load on first attribute access (``refimpl.moe``), keeping ``import refimpl`` cheap.
_SUBMODULES = ("attention", "moe", "rl", "tasks", "distill", "quant", "optim", "testing", "tree", "kernels", "display",
               "model", "accounting")


def load_pretrained(path, dtype=None):
    """Load a hub-layout checkpoint directory (``config.json`` + ``*.safetensors``, one file or sharded):
    DeepSeek-V2/V3, or an R1-Distill student (``model_type`` ``qwen2`` or ``llama``), in float64
    (default) or ``dtype=np.float32``.

    Returns a :class:`refimpl.model.generate.Model`: ``m(input_ids)`` gives float64 logits
    (B, T, V), ``m.generate(input_ids, max_new_tokens=n)`` greedy continuations (B, T + n). See
    :func:`refimpl.model.checkpoint.load_pretrained`; the model package is imported on first call.
    """
    import numpy as np

    from .model.checkpoint import load_pretrained as _load
    return _load(path, np.float64 if dtype is None else dtype)


def load_tokenizer(path):
    """The hub tokenizer of a checkpoint directory (``tokenizer.json`` + ``tokenizer_config.json``): see
    :func:`refimpl.tokenizer.load_tokenizer` (needs the ``tokenizers`` and ``jinja2`` packages)."""
    from .tokenizer import load_tokenizer as _load
    return _load(path)


def __getattr__(name):
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'refimpl' has no attribute {name!r}")


__all__ = ["core", "ModelConfig", "PRESETS", "load_pretrained", "load_tokenizer", "resolve_backend", "__version__",
           *_SUBMODULES]
