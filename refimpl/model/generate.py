r"""Generation: prefill + decode with MLA's latent KV cache, sampling, stop tokens, MTP speculative decoding.

A decoder turns a prompt into a cache in one *prefill* pass, then produces one token per *decode*
step, each step reading the cache instead of recomputing the past. With MLA the cache holds, per
token and layer, only the normalised latent :math:`c^{KV}` and the rotated rope key :math:`k^R`
(DeepSeek-V2 §2.1.2), and decoding runs the *absorbed* attention on it (``impl="absorb"``,
DeepSeek's default; ``"naive"`` decompresses keys and values from the same cache).

Batching prompts of different lengths: refimpl does **not** left-pad (MLA's inference path has no
padding mask, and padding would shift positions). Prompts given as a list are grouped by length and
each group is decoded as one batch with its own caches, so every row sees exactly its own tokens at
positions ``0..T-1`` and the result equals decoding each prompt alone.

Sampling (:func:`sample_next`): greedy at ``temperature=0``, else softmax of ``logits/temperature``
restricted to the nucleus of probability ``top_p`` (Holtzman et al. 2020), drawn with an explicit
``numpy.random.Generator``.

:func:`speculative_generate` uses V3's MTP module as a one-token draft (DeepSeek-V3 §2.2, §5.4.3
reports 85-90% acceptance of the second token): the main model verifies the draft in the same
forward pass that produces the next token, so greedy output is exactly that of :func:`generate`.
"""

from __future__ import annotations

import numpy as np

from .._validate import check_float, check_int, check_integer, check_real
from .structure import check_params
from .transformer import check_input_ids, init_caches, model_forward, model_infer


def _nucleus(logits, temperature, top_p):
    """Probabilities, their descending order and the nucleus flags in that order (Holtzman et al. 2020)."""
    z = np.asarray(logits, dtype=np.float64)                            # (..., V)
    with np.errstate(over="ignore"):
        z = (z - z.max(axis=-1, keepdims=True)) / temperature           # (..., V) <= 0; -inf when tau -> 0
    p = np.exp(z)                                                       # (..., V) the max is exp(0) = 1
    p /= p.sum(axis=-1, keepdims=True)
    order = np.argsort(-p, axis=-1, kind="stable")                      # (..., V) most likely first
    ps = np.take_along_axis(p, order, axis=-1)                          # (..., V)
    keep = (np.cumsum(ps, axis=-1) - ps) < top_p                        # (..., V) mass before it < top_p
    return p, order, keep


def top_p_mask(logits, *, temperature=1.0, top_p=1.0):
    r"""The vocabulary :func:`sample_next` may draw from: the nucleus of mass ``top_p`` of
    :math:`\mathrm{softmax}(z/\tau)` (DeepSeek-V3.2 §3.1 keeps this mask for training).

    Shapes: logits (..., V) -> bool (..., V), True for kept tokens.
    """
    if not temperature > 0:
        raise ValueError(f"temperature: expected a positive number, got {temperature!r}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p: expected a number in (0, 1], got {top_p!r}")
    _, order, keep = _nucleus(logits, temperature, top_p)
    mask = np.zeros(keep.shape, dtype=bool)                             # (..., V)
    np.put_along_axis(mask, order, keep, axis=-1)
    return mask


def sample_next(logits, *, temperature=0.0, top_p=1.0, rng=None):
    r"""Next token per row: argmax if ``temperature == 0``, else a draw from
    :math:`\mathrm{softmax}(z/\tau)` truncated to the smallest set of tokens with mass >= ``top_p``.

    ``logits`` may hold ``-inf`` (banned tokens) but no NaN or ``+inf``, and every row needs a
    finite entry. Any temperature > 0 works, however small: the logits are shifted by their row
    maximum before the division, so :math:`\tau \to 0` tends to the argmax instead of overflowing.

    Shapes: logits (B, V) -> (B,) int64.
    """
    check_float("logits", logits, ndim=2, allow_inf=True)
    if logits.shape[1] == 0:
        raise ValueError(f"logits: expected at least one token (V >= 1), got shape {logits.shape}")
    if logits.size and not np.isfinite(logits.max(axis=-1)).all():
        raise ValueError("logits: a row is entirely -inf (every token banned); nothing can be sampled")
    temperature = check_real("temperature", temperature, low=0.0)
    top_p = check_real("top_p", top_p, low=0.0, high=1.0, low_open=True)
    if temperature == 0:
        return np.argmax(logits, axis=-1).astype(np.int64)              # (B,)
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng: sampling (temperature > 0) needs a numpy.random.Generator, got {type(rng).__name__}")
    p, order, keep = _nucleus(logits, temperature, top_p)              # (B, V) each
    ps = np.where(keep, np.take_along_axis(p, order, axis=-1), 0.0)     # (B, V) sorted, truncated
    cdf = np.cumsum(ps, axis=-1)                                        # (B, V)
    u = rng.random(p.shape[0]) * cdf[:, -1]                             # (B,)
    j = np.minimum((cdf <= u[:, None]).sum(axis=-1), p.shape[1] - 1)    # (B,)
    return order[np.arange(p.shape[0]), j].astype(np.int64)


def _generate_batch(params, config, ids, max_new_tokens, temperature, top_p, rng, stop, pad_id, impl,
                    use_cache, backend):
    b, t = ids.shape
    out = np.full((b, t + max_new_tokens), pad_id, dtype=np.int64)      # (B, T+n)
    out[:, :t] = ids
    done = np.zeros(b, dtype=bool)                                      # (B,)
    if max_new_tokens == 0:
        return out
    dtype = params["lm_head"].dtype
    caches = init_caches(config, b, t + max_new_tokens, dtype) if use_cache else None
    for step in range(max_new_tokens):
        cur = t + step
        if use_cache:
            new = out[:, :cur] if step == 0 else out[:, cur - 1:cur]
            logits, _ = model_infer(new, params, config, caches, 0 if step == 0 else cur - 1, impl=impl,
                                    backend=backend, validate=False)                   # (B, T or 1, V)
        else:
            logits = model_forward(out[:, :cur], params, config, backend=backend, validate=False)[0]  # (B, cur, V)
        tok = sample_next(logits[:, -1], temperature=temperature, top_p=top_p, rng=rng)  # (B,)
        out[:, cur] = np.where(done, pad_id, tok)
        done |= np.isin(tok, stop) & ~done
        if done.all():
            break
    return out


def generate(params, config, input_ids, max_new_tokens, *, temperature=0.0, top_p=1.0, rng=None,
             stop_tokens=(), pad_id=0, impl="absorb", use_cache=True, backend=None):
    """Continue prompts by ``max_new_tokens`` tokens.

    ``input_ids``: a (B, T) int array (same-length prompts) -> (B, T + n) array; or a list of 1-D
    arrays of any lengths -> a list of 1-D arrays (grouped by length, see the module docstring).
    After a row emits one of ``stop_tokens`` (kept in the output) the rest of the row is
    ``pad_id`` (list outputs are cut after the stop token). ``use_cache=False`` recomputes the full
    forward at every step (the reference the cached path is tested against).
    """
    max_new_tokens = check_integer("max_new_tokens", max_new_tokens, low=0)
    check_params(params, config)
    check_real("temperature", temperature, low=0.0)
    check_real("top_p", top_p, low=0.0, high=1.0, low_open=True)
    pad_id = check_integer("pad_id", pad_id, low=0, high=config.vocab_size - 1)
    stop = list(stop_tokens)
    stop = check_int("stop_tokens", np.asarray(stop) if stop else np.zeros(0, np.int64), low=0,
                     high=config.vocab_size).reshape(-1)
    kw = dict(temperature=temperature, top_p=top_p, rng=rng, stop=stop, pad_id=pad_id, impl=impl,
              use_cache=use_cache, backend=backend)
    if temperature and not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng: sampling (temperature > 0) needs a numpy.random.Generator, got {type(rng).__name__}")
    if isinstance(input_ids, list | tuple):
        if not input_ids:
            raise ValueError("input_ids: expected at least one prompt, got an empty list")
        rows = [check_input_ids(np.asarray(r)[None], config, f"input_ids[{i}]")[0] for i, r in enumerate(input_ids)]
        _check_length(max(len(r) for r in rows), max_new_tokens, config)
        result = [None] * len(rows)
        for length in sorted({len(r) for r in rows}):
            members = [i for i, r in enumerate(rows) if len(r) == length]
            out = _generate_batch(params, config, np.stack([rows[i] for i in members]), max_new_tokens, **kw)
            for i, row in zip(members, out, strict=True):
                hits = np.flatnonzero(np.isin(row[length:], stop))
                result[i] = row[:length + hits[0] + 1] if hits.size else row
        return result
    ids = check_input_ids(input_ids, config)
    _check_length(ids.shape[1], max_new_tokens, config)
    return _generate_batch(params, config, ids, max_new_tokens, **kw)


def _check_length(t, n, config):
    if t + n > config.max_position_embeddings:
        raise ValueError(f"max_new_tokens: prompt length {t} + {n} new tokens exceeds the configured maximum "
                         f"(max_position_embeddings={config.max_position_embeddings})")


def speculative_generate(params, config, input_ids, max_new_tokens, *, impl="absorb"):
    """Greedy decoding with the depth-1 MTP module as a draft (batch of one prompt).

    Each step feeds ``[x, draft]`` to the main model (one forward of two tokens): if the main
    model's prediction after ``x`` equals the draft, both the draft and the model's next prediction
    are accepted (two tokens for one main forward); otherwise only the model's own prediction is.
    Rejected cache rows are overwritten by later steps. Returns ``(tokens (1, T + n), info)`` with
    ``info``: ``drafted``, ``accepted``, ``acceptance_rate``, ``main_forwards``.
    """
    from .mtp import mtp_draft_step
    if not isinstance(params, dict) or not params.get("mtp"):
        raise ValueError("params: speculative decoding needs the MTP modules (params['mtp'])")
    check_params(params, config)
    max_new_tokens = check_integer("max_new_tokens", max_new_tokens, low=0)
    ids = check_input_ids(input_ids, config)
    if ids.shape[0] != 1:
        raise ValueError(f"input_ids: speculative_generate takes one prompt, got batch {ids.shape[0]}")
    t = ids.shape[1]
    _check_length(t, max_new_tokens + 1, config)
    dtype = params["lm_head"].dtype
    caches = init_caches(config, 1, t + max_new_tokens + 2, dtype)
    mcache = init_caches(config, 1, t + max_new_tokens + 2, dtype, n_layers=1)[0]   # the MTP block's (MLA or DSA)
    logits, hid = model_infer(ids, params, config, caches, 0, impl=impl)  # (1, T, V), (1, T, D)
    x = int(np.argmax(logits[0, -1]))
    out, drafted, accepted, forwards = [x], 0, 0, 1
    nxt = np.append(ids[0, 1:], x)[None]                                # (1, T)
    draft = int(np.argmax(mtp_draft_step(hid, nxt, params, config, mcache, 0, impl=impl)[0, -1]))
    pos = t
    while len(out) < max_new_tokens:
        feed = np.array([[x, draft]], dtype=np.int64)                   # (1, 2)
        logits, hid = model_infer(feed, params, config, caches, pos, impl=impl)  # (1, 2, V), (1, 2, D)
        forwards += 1
        drafted += 1
        y1 = int(np.argmax(logits[0, 0]))
        if y1 == draft:
            accepted += 1
            y2 = int(np.argmax(logits[0, 1]))
            out += [y1, y2]
            dl = mtp_draft_step(hid, np.array([[y1, y2]]), params, config, mcache, pos, impl=impl)
            x, pos = y2, pos + 2
        else:
            out.append(y1)
            dl = mtp_draft_step(hid[:, :1], np.array([[y1]]), params, config, mcache, pos, impl=impl)
            x, pos = y1, pos + 1
        draft = int(np.argmax(dl[0, -1]))
    toks = np.concatenate([ids[0], np.array(out[:max_new_tokens], dtype=np.int64)])[None]  # (1, T+n)
    return toks, {"drafted": drafted, "accepted": accepted, "main_forwards": forwards,
                  "acceptance_rate": accepted / max(drafted, 1)}


def __getattr__(name):
    # ``refimpl.model.generate.Model`` was the class's home; it now lives in :mod:`.pretrained`
    # (importing it here at the top would make an import cycle: pretrained imports generate)
    if name == "Model":
        from .pretrained import Model
        return Model
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
