"""Diagrams of the architectures: the lineage, MLA, DeepSeekMoE, MTP and expert parallelism.

Each function draws one diagram and returns its matplotlib figure. Every size printed on a diagram
is read from a configuration (:data:`refimpl.config.PRESETS`, by name or as a
:class:`~refimpl.config.ModelConfig`) or computed by :mod:`refimpl.accounting`, so a diagram of
another config shows that config's shapes.
"""

from __future__ import annotations

import numpy as np

from ..accounting import get_config, parameter_counts
from ..config import ModelConfig
from .draw import arrow, box, canvas, label


def as_config(config) -> ModelConfig:
    """``config`` itself, or the preset it names (see :func:`refimpl.accounting.get_config`)."""
    if isinstance(config, ModelConfig):
        return config
    if isinstance(config, str):
        return get_config(config)
    raise TypeError(f"config: expected a ModelConfig or a preset name, got {type(config).__name__}")


def billions(n: float) -> str:
    """A parameter count in billions, as papers write it: ``'671B'``, ``'2.4B'``."""
    return f"{n / 1e9:.0f}B" if n >= 10e9 else f"{n / 1e9:.1f}B"


def lineage_diagram(dense="deepseek-67b", v2="deepseek-v2", v3="deepseek-v3"):
    """DeepSeek LLM -> V2 -> V3 -> R1-Zero -> R1 -> distilled students: what each added, and its size.

    Total and active parameters are computed from the three configs with
    :func:`refimpl.accounting.parameter_counts`; the students' sizes are those of the R1 paper (§2.4).
    """
    sizes = {}
    for key, cfg in (("dense", dense), ("v2", v2), ("v3", v3)):
        p = parameter_counts(as_config(cfg))
        sizes[key] = (billions(p["total"]), billions(p["active"]))
    v3_size = f"{sizes['v3'][0]} total, {sizes['v3'][1]} active"
    steps = [
        ("DeepSeek LLM", "Jan 2024", f"dense decoder, GQA\n{sizes['dense'][0]} parameters,\nall active", "weight"),
        ("DeepSeek-V2", "May 2024", f"+ MLA (latent KV cache)\n+ DeepSeekMoE experts\n{sizes['v2'][0]} total, "
                                    f"{sizes['v2'][1]} active", "weight"),
        ("DeepSeek-V3", "Dec 2024", f"+ bias balancing, no aux loss\n+ multi-token prediction\n+ FP8 training\n"
                                    f"{v3_size}", "weight"),
        ("DeepSeek-R1-Zero", "Jan 2025", f"GRPO on V3-Base with\nrule rewards, no SFT\n(same weights:\n{v3_size})",
         "stage"),
        ("DeepSeek-R1", "Jan 2025", f"+ cold-start SFT\n+ 4-stage recipe with\nrejection sampling\n{v3_size}",
         "stage"),
        ("distilled students", "Jan 2025", "SFT on 800K R1 samples\nQwen2.5 and Llama,\n1.5B to 70B, dense",
         "model"),
    ]
    w, gap, h = 2.25, 0.45, 2.1
    fig, ax = canvas(len(steps) * (w + gap) + 0.2, 3.6)
    for i, (name, date, body, color) in enumerate(steps):
        x = 0.25 + i * (w + gap)
        box(ax, x, 0.35, w, h, color=color)
        label(ax, x + w / 2, 0.35 + h - 0.25, name, fontsize=10.5)
        label(ax, x + w / 2, 0.35 + h - 0.52, date, fontsize=8, style="italic")
        label(ax, x + w / 2, 0.35 + (h - 0.7) / 2, body, fontsize=8.5)
        if i:
            arrow(ax, (x - gap + 0.04, 0.35 + h / 2), (x - 0.04, 0.35 + h / 2))
    label(ax, 0.25 + 1.5 * (w + gap) - gap / 2, 3.2, "architecture: cheaper to train and to serve", fontsize=10)
    label(ax, 0.25 + 4.5 * (w + gap) - gap / 2, 3.2, "training: reasoning from reinforcement learning",
          fontsize=10)
    ax.plot([0.25, 0.25 + 3 * (w + gap) - gap], [2.95, 2.95], color="#1f77b4", lw=2)
    ax.plot([0.25 + 3 * (w + gap), 0.25 + 6 * (w + gap) - gap], [2.95, 2.95], color="#2ca02c", lw=2)
    return fig


def mla_diagram(config="deepseek-v3"):
    """Multi-head latent attention with the shapes of ``config``: the latent path, decoupled RoPE, the cache,
    and what absorbed decoding skips (DeepSeek-V2 §2.1, eqs. 9-19)."""
    c = as_config(config)
    d, dc, h, dn, dr, dv = (c.hidden_size, c.kv_lora_rank, c.num_attention_heads, c.qk_nope_head_dim,
                            c.qk_rope_head_dim, c.v_head_dim)
    full = h * (dn + dr) + h * dv
    fig, ax = canvas(14, 7.6)
    box(ax, 0.2, 3.4, 1.5, 0.9, f"$h_t$\nD = {d:,}", color="input")
    if c.q_lora_rank:
        box(ax, 2.6, 5.8, 1.8, 0.9, f"$c^Q_t$\n$D_q$ = {c.q_lora_rank:,}")
        arrow(ax, (1.7, 4.1), (2.6, 6.2), "$W^{DQ}$", text_offset=(-0.35, 0.05))
        q_src = (4.4, 6.25)
    else:
        q_src = (1.7, 4.25)
    box(ax, 5.4, 6.4, 2.0, 0.8, f"$q^C_t$: H x $D_n$\n{h} x {dn}")
    box(ax, 5.4, 5.2, 2.0, 0.8, f"$q^R_t$: H x $D_r$\n{h} x {dr}", color="rope")
    arrow(ax, q_src, (5.4, 6.8), "$W^{UQ}$")
    arrow(ax, q_src, (5.4, 5.6), "$W^{QR}$, RoPE", text_offset=(0, -0.3))
    box(ax, 2.6, 3.4, 1.8, 0.9, f"$c^{{KV}}_t$\n$D_c$ = {dc}", color="cache", bold=True)
    arrow(ax, (1.7, 3.85), (2.6, 3.85), "$W^{DKV}$")
    box(ax, 5.4, 3.9, 2.0, 0.8, f"$k^C_t$: H x $D_n$\n{h} x {dn}", dashed=True)
    box(ax, 5.4, 2.7, 2.0, 0.8, f"$v_t$: H x $D_v$\n{h} x {dv}", dashed=True)
    arrow(ax, (4.4, 3.95), (5.4, 4.3), "$W^{UK}$")
    arrow(ax, (4.4, 3.75), (5.4, 3.1), "$W^{UV}$", text_offset=(0, -0.35))
    box(ax, 2.6, 1.4, 1.8, 0.9, f"$k^R_t$: $D_r$ = {dr}\none for all heads", color="cache", bold=True)
    arrow(ax, (0.95, 3.4), (2.6, 1.85), "$W^{KR}$, RoPE", text_offset=(-0.5, -0.2))
    box(ax, 8.6, 3.3, 2.6, 2.6, "attention of each head\n\n$q = [q^C; q^R]$\n$k = [k^C; k^R]$\n\n"
        f"softmax($q \\cdot k$ / $\\sqrt{{{dn + dr}}}$) $v$", color="weight")
    for y in (6.8, 5.6):
        arrow(ax, (7.4, y), (8.6, 5.2 if y > 6 else 4.9))
    arrow(ax, (7.4, 4.3), (8.6, 4.3))
    arrow(ax, (7.4, 3.1), (8.6, 3.7))
    arrow(ax, (4.4, 1.85), (9.9, 3.3), "", dashed=True)
    box(ax, 12.0, 4.15, 1.8, 0.9, "$o_t$: H x $D_v$\n-> $W^O$ -> D")
    arrow(ax, (11.2, 4.6), (12.0, 4.6))
    box(ax, 8.6, 0.2, 5.2, 2.5, color="note")
    label(ax, 11.2, 1.45, f"cached per token and layer (orange):\n$c^{{KV}}_t$ + $k^R_t$ = {dc} + {dr} = {dc + dr} "
          f"numbers\n\nfull keys and values of the same heads:\nH($D_n$ + $D_r$) + H $D_v$ = {full:,} numbers "
          f"({full / (dc + dr):.0f}x more)", fontsize=9)
    box(ax, 0.2, 0.2, 8.0, 1.0, color="note")
    label(ax, 4.2, 0.7, "absorbed decoding: $W^{UK}$ is folded into the query and $W^{UV}$ into $W^O$, so "
          "attention\nruns on the cached $c^{KV}$ and $k^R$ directly; the dashed $k^C$ and $v$ are never built.",
          fontsize=8.5)
    return fig


def moe_diagram(config="deepseek-v3", seed=0):
    """DeepSeekMoE routing with the sizes of ``config``: shared and routed experts, group-limited
    selection, and (for ``noaux_tc``) the balancing bias that is used to select but not to weight
    (DeepSeek-V3 §2.1.2, eqs. 12-16). The selected groups and experts are a random example."""
    c = as_config(config)
    e, k, g, tg, es = c.n_routed_experts, c.num_experts_per_tok, c.n_group, c.topk_group, c.n_shared_experts
    if not e:
        raise ValueError(f"config: expected an MoE config with routed experts, got n_routed_experts={e}")
    from matplotlib.patches import Rectangle

    per = e // g
    fig, ax = canvas(14, 6.4)
    box(ax, 0.2, 4.9, 2.4, 0.9, f"token $u_t$\nD = {c.hidden_size:,}", color="input")
    score = "sigmoid" if c.scoring_func == "sigmoid" else "softmax"
    box(ax, 0.2, 3.3, 3.6, 1.1, f"router: $s_i$ = {score}($u_t \\cdot e_i$)\nfor each of E = {e} routed experts")
    arrow(ax, (1.4, 4.9), (1.4, 4.4))
    if c.topk_method == "noaux_tc":
        sel = "select with $s_i + b_i$\n$b_i$: a per-expert bias, nudged\nafter each step by the expert's load;\n" \
              "used to choose, never to weight"
    else:
        sel = "select with $s_i$\n(an auxiliary loss\nkeeps the load balanced)"
    box(ax, 0.2, 1.6, 3.6, 1.3, sel, color="note", fontsize=8.5)
    arrow(ax, (2.0, 3.3), (2.0, 2.9))
    rng = np.random.default_rng(seed)
    groups = set(rng.choice(g, size=tg, replace=False).tolist())
    chosen = set(rng.choice([i for i in range(e) if i // per in groups], size=k, replace=False).tolist())
    cols = min(per, 4)
    rows = -(-per // cols)
    cell = min(0.22, 1.9 / rows)
    gw = cols * cell + 0.2
    x0 = 4.4
    step = min(gw + 0.15, (13.8 - x0) / g)
    for j in range(g):
        gx = x0 + j * step
        box(ax, gx, 2.3, step - 0.12, rows * cell + 0.2, color="expert" if j in groups else "idle",
            dashed=j not in groups)
        for i in range(per):
            ex = j * per + i
            cx, cy = gx + 0.1 + (i % cols) * cell, 2.4 + (rows - 1 - i // cols) * cell
            ax.add_patch(Rectangle((cx, cy), cell * 0.85, cell * 0.85, edgecolor="#666666", lw=0.4,
                                   facecolor="#2ca02c" if ex in chosen else "#ffffff"))
    top = 2.3 + rows * cell + 0.2
    label(ax, 9.1, top + 0.55, f"G = {g} groups of {per} routed experts: keep the best {tg} groups (shaded), "
          f"then the top K = {k} experts inside them (green)", fontsize=9)
    arrow(ax, (3.8, 2.25), (x0, 2.9))
    box(ax, 4.4, 0.3, 3.6, 1.2, f"{es} shared expert{'s' if es != 1 else ''}:\nevery token, no router",
        color="expert")
    box(ax, 8.5, 0.3, 5.3, 1.5, f"gate weights from $s_i$ without the bias\n"
        f"{'normalised over the K chosen, ' if c.norm_topk_prob else ''}x {c.routed_scaling_factor:g}\n\n"
        "$h_t = u_t$ + shared($u_t$) + $\\sum_i g_i$ FFN$_i(u_t)$", fontsize=9)
    arrow(ax, (11.1, 2.3), (11.1, 1.8))
    return fig


def mtp_diagram(config="deepseek-v3"):
    """Multi-token prediction (DeepSeek-V3 §2.2) in training, and its use as a draft for speculative decoding."""
    c = as_config(config)
    d, n_layers = c.hidden_size, c.num_hidden_layers
    fig, ax = canvas(14, 6.0)
    label(ax, 3.9, 5.7, "training: one more token predicted from each position", fontsize=10)
    box(ax, 0.2, 0.3, 1.6, 0.7, "tokens $t_1 \\ldots t_T$", color="input")
    box(ax, 0.2, 1.5, 1.6, 2.7, f"main model\n\nembedding\n{n_layers} blocks\nhead", color="weight")
    arrow(ax, (1.0, 1.0), (1.0, 1.5))
    box(ax, 0.2, 4.6, 1.6, 0.7, "predicts $t_{i+1}$", color="expert")
    arrow(ax, (1.0, 4.2), (1.0, 4.6))
    box(ax, 2.5, 1.5, 2.6, 0.8, "RMSNorm($h_i$)  and\nRMSNorm(Emb($t_{i+1}$))", color="input")
    arrow(ax, (1.8, 2.9), (2.5, 1.9), "$h_i$", text_offset=(0.1, 0.05))
    box(ax, 2.5, 2.6, 2.6, 0.7, f"concat ({2 * d:,}) -> eh_proj -> {d:,}")
    box(ax, 2.5, 3.6, 2.6, 0.6, "one transformer block")
    box(ax, 2.5, 4.6, 2.6, 0.7, "shared head: predicts $t_{i+2}$", color="expert")
    for y0, y1 in ((2.3, 2.6), (3.3, 3.6), (4.2, 4.6)):
        arrow(ax, (3.8, y0), (3.8, y1))
    label(ax, 6.3, 3.0, f"{c.num_nextn_predict_layers or 1} MTP\nmodule\n(embedding\nand head\nshared)",
          fontsize=8.5)
    ax.plot([7.3, 7.3], [0.2, 5.8], color="#999999", lw=0.8)
    label(ax, 10.6, 5.7, "decoding: the MTP module drafts, the next pass verifies", fontsize=10)
    rows = [("pass n", ["$t_{n+1}$ (main)", "$\\hat t_{n+2}$ (draft)"], ["expert", "note"]),
            ("pass n+1", ["check $\\hat t_{n+2}$", "$t_{n+3}$ (main)", "$\\hat t_{n+4}$"],
             ["weight", "expert", "note"])]
    for r, (name, cells, colors) in enumerate(rows):
        y = 4.3 - r * 1.5
        label(ax, 8.0, y + 0.35, name, fontsize=9)
        for i, (text, color) in enumerate(zip(cells, colors, strict=True)):
            box(ax, 8.7 + i * 1.75, y, 1.6, 0.7, text, color=color, fontsize=8.5)
    arrow(ax, (11.25, 4.3), (9.5, 3.5), "", dashed=True)
    box(ax, 7.7, 0.3, 6.1, 1.8, "if the draft equals what the main model predicts at that position,\n"
        "it is kept: two tokens for one forward pass; otherwise it is dropped.\n"
        "DeepSeek-V3 reports 85-90% of second-token drafts accepted,\nabout 1.8x the tokens per second.",
        color="note", fontsize=8.5)
    return fig


def expert_parallel_diagram(config="deepseek-v3", n_ranks=4, tokens_per_rank=3, seed=0):
    """Expert parallelism: experts spread over ``n_ranks`` processes, an all-to-all that sends each token
    to the ranks of its experts and one that brings the outputs back (DeepSeek-V3 §3.2.2)."""
    c = as_config(config)
    e, k = c.n_routed_experts, c.num_experts_per_tok
    if n_ranks < 2 or e % n_ranks:
        raise ValueError(f"n_ranks: expected >= 2 ranks dividing E = {e} routed experts, got {n_ranks}")
    per = e // n_ranks
    fig, ax = canvas(14, 6.2)
    rng = np.random.default_rng(seed)
    w = 12.0 / n_ranks
    token_xy, expert_xy = {}, {}
    for r in range(n_ranks):
        x = 1.6 + r * w
        box(ax, x, 0.3, w - 0.3, 5.0, color="idle", dashed=True)
        label(ax, x + (w - 0.3) / 2, 5.05, f"rank {r}", fontsize=9.5)
        for t in range(tokens_per_rank):
            tx = x + 0.15 + t * (w - 0.6) / tokens_per_rank
            box(ax, tx, 4.1, 0.6, 0.5, f"$x_{{{r * tokens_per_rank + t}}}$", color="input", fontsize=8)
            token_xy[r, t] = (tx + 0.3, 4.1)
        box(ax, x + 0.15, 0.5, w - 0.6, 0.9, f"experts {r * per}-{(r + 1) * per - 1}\n({per} of {e})",
            color="expert", fontsize=8.5)
        expert_xy[r] = (x + (w - 0.3) / 2, 1.4)
    for (r, _t), (x, y) in token_xy.items():
        for dest in rng.choice(n_ranks, size=2, replace=False):
            ex, ey = expert_xy[int(dest)]
            arrow(ax, (x, y), (ex + (x - ex) * 0.15, ey), color="#1f77b4" if dest != r else "#999999")
    label(ax, 0.8, 2.8, "dispatch\n(all-to-all)\n\nexpert FFN\n\ncombine\n(all-to-all\nback, x gate)",
          fontsize=8.5)
    label(ax, 7.6, 5.8, f"each token goes to the ranks holding its K = {k} experts (two of them drawn; blue: "
          f"to another rank);\n"
          f"with node-limited routing it reaches at most {c.topk_group} nodes", fontsize=9)
    return fig
