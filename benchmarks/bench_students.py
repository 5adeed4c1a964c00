"""R1-Distill-Qwen-1.5B from its hub layout: load time, peak memory, prefill and decode, refimpl vs transformers.

Run from the shell (minutes, ~10 GB of RAM, ~3.6 GB of disk; not part of ``benchmarks.run`` or the tests)::

    python -m benchmarks.bench_students [--layers 28] [--prefill 256] [--decode 32] [--dir /tmp/x] [--out r.json]

It writes the full DeepSeek-R1-Distill-Qwen-1.5B configuration (hidden 1536, 28 layers, 12 heads, 2 KV
heads, intermediate 8960, vocabulary 151936, untied, q/k/v biases; reference
``students-qwen2-llama3.md`` §1.1) with random BF16 weights, streamed tensor by tensor into a
temporary ``model.safetensors``, then measures, each in a fresh process so that peak resident memory
(``VmHWM``) belongs to one loader: ``refimpl.load_pretrained(dtype=float32)`` and, when torch is
installed, ``AutoModelForCausalLM.from_pretrained(dtype=float32)``; a 256-token prefill and 32 greedy
decode steps with a KV cache in float32. Reports ratios (the machine is shared), peak RSS over the
float32 parameter bytes (target <= 1.25), and the fraction of the machine's memory bandwidth (a large
``np.copyto``) that decoding reaches (each decoded token reads every weight once).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

CONFIG = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 1536,
          "intermediate_size": 8960, "num_hidden_layers": 28, "num_attention_heads": 12, "num_key_value_heads": 2,
          "vocab_size": 151936, "max_position_embeddings": 131072, "rope_theta": 10000, "rms_norm_eps": 1e-6,
          "tie_word_embeddings": False, "use_sliding_window": False, "sliding_window": 4096, "max_window_layers": 21,
          "hidden_act": "silu", "bos_token_id": 151643, "eos_token_id": 151643, "torch_dtype": "bfloat16",
          "initializer_range": 0.02}


def write_random_checkpoint(path, layers):
    """config.json + model.safetensors with N(0, 0.02) BF16 weights (unit norms, small biases), one tensor
    in memory at a time. Returns the parameter count."""
    import numpy as np

    from refimpl.model.checkpoint import config_from_hf, hub_spec
    from refimpl.model.safetensors_io import float32_to_bf16
    cfg = {**CONFIG, "num_hidden_layers": layers}
    spec = hub_spec(config_from_hf(cfg))
    header, off = {}, 0
    for name, _, shape, _ in spec:
        n = int(np.prod(shape)) * 2
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [off, off + n]}
        off += n
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    rng = np.random.default_rng(0)
    with open(os.path.join(path, "model.safetensors"), "wb") as f:
        f.write(len(text).to_bytes(8, "little") + text)
        for name, _, shape, _ in spec:
            a = (np.ones(shape, np.float32) if name.endswith("norm.weight")
                 else rng.standard_normal(shape, dtype=np.float32) * np.float32(0.02))
            f.write(float32_to_bf16(a).tobytes())
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    return off // 2


def _rss_gb():
    """This process's peak resident memory in GB: ``VmHWM`` (reset by exec, unlike ``ru_maxrss``, which a
    child inherits from the parent that wrote the checkpoint)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) * 1024 / 1e9  # KiB -> GB
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6


def run_refimpl(path, prefill, decode):
    import numpy as np

    from refimpl import load_pretrained
    from refimpl.model.transformer import init_caches, model_infer
    base = _rss_gb()
    t0 = time.perf_counter()
    m = load_pretrained(path, dtype=np.float32)
    load = time.perf_counter() - t0
    peak_load = _rss_gb()
    ids = np.random.default_rng(1).integers(0, m.config.vocab_size, (1, prefill))
    caches = init_caches(m.config, 1, prefill + decode, np.float32)
    t0 = time.perf_counter()
    logits, _ = model_infer(ids, m.params, m.config, caches, 0)
    t_prefill = time.perf_counter() - t0
    toks, t0 = [], time.perf_counter()
    for step in range(decode):
        tok = int(np.argmax(logits[0, -1]))
        toks.append(tok)
        logits, _ = model_infer(np.array([[tok]]), m.params, m.config, caches, prefill + step)
    t_decode = time.perf_counter() - t0
    return {"load_s": load, "rss_before_gb": base, "peak_rss_load_gb": peak_load, "prefill_s": t_prefill,
            "decode_tok_s": decode / t_decode, "tokens": toks}


def run_transformers(path, prefill, decode):
    import numpy as np
    import torch
    import transformers
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    base = _rss_gb()
    t0 = time.perf_counter()
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    load = time.perf_counter() - t0
    peak_load = _rss_gb()
    ids = torch.tensor(np.random.default_rng(1).integers(0, CONFIG["vocab_size"], (1, prefill)))
    with torch.no_grad():
        t0 = time.perf_counter()
        out = model(ids, use_cache=True)
        t_prefill = time.perf_counter() - t0
        past, logits, toks = out.past_key_values, out.logits, []
        t0 = time.perf_counter()
        for _ in range(decode):
            tok = int(logits[0, -1].argmax())
            toks.append(tok)
            out = model(torch.tensor([[tok]]), past_key_values=past, use_cache=True)
            past, logits = out.past_key_values, out.logits
        t_decode = time.perf_counter() - t0
    return {"load_s": load, "rss_before_gb": base, "peak_rss_load_gb": peak_load, "prefill_s": t_prefill,
            "decode_tok_s": decode / t_decode, "tokens": toks}


def memory_bandwidth_gbs(gb=1.0):
    """Best of 5 ``np.copyto`` of a ``gb``-GB float32 array: bytes read + written per second."""
    import numpy as np
    a = np.ones(int(gb * 1e9) // 4, np.float32)
    b = np.empty_like(a)
    best = min(_timed(lambda: np.copyto(b, a)) for _ in range(5))
    return 2 * a.nbytes / best / 1e9


def _timed(f):
    t0 = time.perf_counter()
    f()
    return time.perf_counter() - t0


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_students", description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=28)
    p.add_argument("--prefill", type=int, default=256)
    p.add_argument("--decode", type=int, default=32)
    p.add_argument("--dir", default=None, help="where to write the checkpoint (default: a temporary directory)")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--child", choices=("refimpl", "transformers"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        fn = run_refimpl if args.child == "refimpl" else run_transformers
        print(json.dumps(fn(args.dir, args.prefill, args.decode)))
        return 0
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        t0 = time.perf_counter()
        n = write_random_checkpoint(tmp, args.layers)
        print(f"wrote {n:,} BF16 parameters in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        res = {"params": n, "param_bytes_f32_gb": 4 * n / 1e9, "layers": args.layers, "prefill": args.prefill,
               "decode": args.decode, "threads": len(os.sched_getaffinity(0))}
        for who in ("refimpl", "transformers"):
            if who == "transformers":
                try:
                    import torch  # noqa: F401
                except ImportError:
                    continue
            cmd = [sys.executable, "-m", "benchmarks.bench_students", "--child", who, "--dir", tmp,
                   "--prefill", str(args.prefill), "--decode", str(args.decode)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            res[who] = json.loads(out.strip().splitlines()[-1])
            print(f"{who}: {res[who]}", file=sys.stderr)
    res["bandwidth_gbs"] = memory_bandwidth_gbs()
    r = res["refimpl"]
    r["peak_rss_over_f32_params"] = r["peak_rss_load_gb"] / res["param_bytes_f32_gb"]
    r["decode_bandwidth_fraction"] = r["decode_tok_s"] * res["param_bytes_f32_gb"] / res["bandwidth_gbs"]
    if "transformers" in res:
        t = res["transformers"]
        t["peak_rss_over_f32_params"] = t["peak_rss_load_gb"] / res["param_bytes_f32_gb"]
        t["decode_bandwidth_fraction"] = t["decode_tok_s"] * res["param_bytes_f32_gb"] / res["bandwidth_gbs"]
        res["ratios"] = {"prefill_refimpl_over_transformers": r["prefill_s"] / t["prefill_s"],
                         "decode_tok_s_refimpl_over_transformers": r["decode_tok_s"] / t["decode_tok_s"],
                         "load_refimpl_over_transformers": r["load_s"] / t["load_s"],
                         "greedy_tokens_equal": r["tokens"] == t["tokens"]}
    print(json.dumps(res, indent=2))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
