"""DSA decode vs dense MLA decode (DeepSeek-V3.2 sparse attention), refimpl-NumPy vs torch.

One new token against a cache of S = 4k (``dsa/decode-medium``) or 16k (``dsa/decode-long``) earlier
tokens (the quick shapes use 1/16 of each, hence names that do not state a size), batch 1, float32, one layer with
DeepSeek-V3's attention shapes (H = 128, Dq = 1536, Dc = 512, Dr = 64, Dn = Dv = 128) and V3.2's
indexer (64 heads of 128, ``index_topk`` = 2048); the hidden size is cut to 1024 (it only sizes the
token's own projections, which do not grow with S). Variants:

* ``refimpl-numpy``: :func:`~refimpl.attention.dsa_infer` (absorbed MLA on the 2,048 gathered
  latent rows the indexer selects, plus the indexer over all S keys of its key cache);
* ``refimpl-numpy-dense``: :func:`~refimpl.attention.mla_infer`, dense absorbed MLA over all S;
* ``torch`` / ``torch-dense``: the same two computations written with torch ops (``torch.topk``
  selection; the random scores have no ties, so it agrees with refimpl's lower-position rule).

Bytes read per step (float32 caches; reported in the case parameters): dense S x 576 x 4, DSA
min(k, S) x 576 x 4 + S x 128 x 4 (latent rows actually gathered, plus the whole indexer cache).
No Numba variant: the work is two BLAS products per path plus a partition, which NumPy already
hands to BLAS / C.
"""

from __future__ import annotations

import numpy as np

from refimpl import core
from refimpl.attention import dsa_infer, init_dsa_cache, init_dsa_params, mla_infer
from refimpl.attention.dsa import split_params
from refimpl.config import ModelConfig

from .harness import NUMPY, TORCH, Case, assert_outputs_close, import_torch, register

DENSE, TORCH_DENSE = "refimpl-numpy-dense", "torch-dense"


def dsa_bench_config(quick):
    """V3 attention + V3.2 indexer dims with hidden size 1024 (quick: everything small, k = 64)."""
    cfg = ModelConfig.preset("deepseek-v32").replace(hidden_size=1024, max_position_embeddings=32768,
                                                      rope_scaling=None)
    if quick:
        cfg = cfg.replace(hidden_size=128, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=64,
                          kv_lora_rank=64, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16)
        cfg.extra.update(index_n_heads=4, index_head_dim=16, index_topk=64)
    return cfg


def _torch_decode(torch, cfg, p, latent, index_k, s, sparse):
    """One decode step (B = 1) in torch, writing row s of both caches; DSA if ``sparse``."""
    F = torch.nn.functional
    h, dn, dr, dc, dq = (cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.kv_lora_rank,
                         cfg.q_lora_rank)
    hi, di, k = (int(cfg.extra[n]) for n in ("index_n_heads", "index_head_dim", "index_topk"))
    ang = torch.tensor(s * core.rope_inv_freq(dr, cfg.rope_theta, None), dtype=torch.float32)  # (Dr/2,)
    cos, sin = torch.cos(ang), torch.sin(ang)
    scale = core.softmax_scale(dn + dr, None)
    w_uk = p["kv_b_proj"].view(h, -1, dc)[:, :dn]                       # (H, Dn, Dc)
    w_uv = p["kv_b_proj"].view(h, -1, dc)[:, dn:]                       # (H, Dv, Dc)
    ix = p["indexer"]

    def pairs(v):          # MLA: rotate adjacent pairs (2i, 2i+1)
        a, b = v[..., 0::2], v[..., 1::2]
        return torch.stack([a * cos - b * sin, a * sin + b * cos], -1).flatten(-2)

    def halves(v):         # indexer: rotate (i, i + Dr/2)
        a, b = v[..., : dr // 2], v[..., dr // 2:]
        return torch.cat([a * cos - b * sin, a * sin + b * cos], -1)

    def step(x):
        with torch.no_grad():
            cq = F.rms_norm(x @ p["q_a_proj"].T, (dq,), p["q_a_layernorm"], 1e-6)  # (1, 1, Dq)
            q = (cq @ p["q_b_proj"].T).view(h, dn + dr)
            a = (x @ p["kv_a_proj_with_mqa"].T).view(-1)
            latent[s, :dc] = F.rms_norm(a[:dc], (dc,), p["kv_a_layernorm"], 1e-6)
            latent[s, dc:] = pairs(a[dc:])
            lat = latent[: s + 1]                                       # (S, Dc+Dr)
            if sparse:
                qi = (cq @ ix["wq_b"].T).view(hi, di)
                qi = torch.cat([halves(qi[:, :dr]), qi[:, dr:]], -1)    # (HI, DI)
                n = F.layer_norm((x @ ix["wk"].T).view(-1), (di,), ix["k_norm"]["weight"], ix["k_norm"]["bias"], 1e-6)
                index_k[s] = torch.cat([halves(n[:dr]), n[dr:]])
                w = (x @ ix["weights_proj"].T).view(hi) * (hi * di) ** -0.5
                scores = w @ torch.relu(qi @ index_k[: s + 1].T)        # (S,)
                sel = torch.topk(scores, min(k, s + 1)).indices.sort().values
                lat = lat[sel]                                          # (K, Dc+Dr)
            qc = torch.cat([torch.einsum("hd,hdc->hc", q[:, :dn], w_uk), pairs(q[:, dn:])], -1)  # (H, Dc+Dr)
            prob = torch.softmax((qc @ lat.T) * scale, -1)              # (H, K)
            o = torch.einsum("hc,hvc->hv", prob @ lat[:, :dc], w_uv)
            return o.reshape(1, 1, -1) @ p["o_proj"].T
    return step


def _to_torch(torch, tree):
    return {k: _to_torch(torch, v) if isinstance(v, dict) else torch.from_numpy(v) for k, v in tree.items()}


def _decode_case(context, quick):
    # names say medium / long, not a size: the quick page runs each at 1/16 of its context
    s = context // 16 if quick else context
    cfg = dsa_bench_config(quick)
    k, di = int(cfg.extra["index_topk"]), int(cfg.extra["index_head_dim"])
    rng = np.random.default_rng(0)
    p = init_dsa_params(cfg, rng, dtype=np.float32)
    for name in ("wq_b", "wk", "weights_proj"):            # O(1) index scores: few near-ties
        p["indexer"][name] = p["indexer"][name] * np.float32(50.0)
    x = rng.standard_normal((1, 1, cfg.hidden_size), dtype=np.float32)
    cache = init_dsa_cache(cfg, 1, s + 1, dtype=np.float32)
    width = cache.latent.latent.shape[-1]
    cache.latent.latent[:, :s] = rng.standard_normal((1, s, width), dtype=np.float32)
    cache.index_k[:, :s] = rng.standard_normal((1, s, di), dtype=np.float32)
    mla_p, _ = split_params(p)
    dense_bytes, dsa_bytes = 4 * s * width, 4 * (min(k, s + 1) * width + (s + 1) * di)
    case = Case(
        params={"context": s, "B": 1, "D": cfg.hidden_size, "H": cfg.num_attention_heads, "index_topk": k,
                "dtype": "float32", "dense_cache_bytes_read": dense_bytes, "dsa_cache_bytes_read": dsa_bytes,
                "bytes_ratio_dense_over_dsa": round(dense_bytes / dsa_bytes, 2)},
        description=(f"One decode step at context {s}, V3 attention + V3.2 indexer shapes (one layer, float32): "
                     "refimpl-numpy = DSA (indexer over all keys, absorbed MLA on the top-k gathered rows), "
                     "refimpl-numpy-dense = dense absorbed MLA; torch twins of both (checked pairwise)."))
    case.add(NUMPY, lambda: dsa_infer(x, p, cfg, cache, s))
    case.add(DENSE, lambda: mla_infer(x, mla_p, cfg, cache.latent, s), kind="numpy")
    torch = import_torch()
    if torch is None:
        case.skip(TORCH, "torch is not installed")
        case.skip(TORCH_DENSE, "torch is not installed")
    else:
        tp, xt = _to_torch(torch, p), torch.from_numpy(x)
        lat_t, idx_t = torch.from_numpy(cache.latent.latent[0].copy()), torch.from_numpy(cache.index_k[0].copy())
        sparse_step = _torch_decode(torch, cfg, tp, lat_t, idx_t, s, True)
        dense_step = _torch_decode(torch, cfg, tp, lat_t.clone(), idx_t.clone(), s, False)
        case.add(TORCH, lambda: sparse_step(xt))
        case.add(TORCH_DENSE, lambda: dense_step(xt), kind="torch")

    def check(outs):
        assert_outputs_close({n: v for n, v in outs.items() if n in (NUMPY, TORCH)}, reference=NUMPY,
                             rtol=2e-4, atol_scale=2e-5)
        assert_outputs_close({n: v for n, v in outs.items() if n in (DENSE, TORCH_DENSE)}, reference=DENSE,
                             rtol=2e-4, atol_scale=2e-5)
    case.check = check
    return case


@register("dsa/decode-medium")
def decode_medium(quick: bool) -> Case:
    return _decode_case(4096, quick)


@register("dsa/decode-long")
def decode_long(quick: bool) -> Case:
    return _decode_case(16384, quick)
