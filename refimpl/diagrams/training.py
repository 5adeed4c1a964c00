"""Diagrams of the training recipes: GRPO's group baseline and the stages of DeepSeek-R1.

Each function draws one diagram and returns its matplotlib figure; the numbers on the GRPO diagram
are computed by :func:`refimpl.rl.group_advantages` from the example rewards it is given.
"""

from __future__ import annotations

import numpy as np

from ..rl.advantages import group_advantages
from .draw import arrow, box, canvas, label


def grpo_diagram(rewards=(1, 0, 1, 0, 0, 1, 0, 0)):
    """One GRPO group (DeepSeekMath §4.1): G answers to one question, their rule rewards, and the
    advantages measured against the group's own mean and standard deviation (no value network)."""
    r = np.asarray(rewards, dtype=np.float64)                          # (G,)
    if r.ndim != 1 or r.size < 2:
        raise ValueError(f"rewards: expected one group of at least 2 rewards, got shape {r.shape}")
    g = r.size
    adv, _ = group_advantages(r, g)                                    # (G,)
    mean, std = r.mean(), r.std(ddof=1)
    row = min(0.6, 4.6 / g)
    fig, ax = canvas(13, 0.9 + g * row + 0.9)
    top = 0.6 + g * row
    box(ax, 0.2, top / 2 - 0.45, 1.7, 0.9, "question $q$", color="input")
    box(ax, 2.5, top / 2 - 0.6, 1.8, 1.2, "policy $\\pi_\\theta$\nsamples G = "
        f"{g}\nanswers", color="weight")
    arrow(ax, (1.9, top / 2), (2.5, top / 2))
    for i in range(g):
        y = 0.5 + (g - 1 - i) * row
        arrow(ax, (4.3, top / 2), (5.0, y + row * 0.4))
        box(ax, 5.0, y, 1.6, row * 0.8, f"answer $o_{{{i + 1}}}$", color="input", fontsize=8)
        box(ax, 7.0, y, 1.3, row * 0.8, f"$r_{{{i + 1}}}$ = {r[i]:g}", color="expert" if r[i] > mean else "idle",
            fontsize=8)
        box(ax, 8.8, y, 1.4, row * 0.8, f"$\\hat A_{{{i + 1}}}$ = {adv[i]:+.2f}", fontsize=8,
            color="expert" if adv[i] > 0 else "cache")
    label(ax, 7.65, top + 0.35, "rule reward", fontsize=9)
    label(ax, 9.5, top + 0.35, "advantage", fontsize=9)
    box(ax, 10.6, top / 2 - 1.2, 2.2, 2.4, f"baseline = the\ngroup's mean {mean:.3f},\nscale = its std {std:.3f}"
        "\n\n$\\hat A_i = (r_i - $mean$)$ / std\n\nno value network", color="note", fontsize=8.5)
    return fig


def r1_pipeline_diagram():
    """DeepSeek-R1-Zero and the four stages of DeepSeek-R1, then distillation (DeepSeek-R1 §2.2-2.4)."""
    fig, ax = canvas(15, 5.6)
    box(ax, 0.2, 2.3, 1.7, 1.0, "DeepSeek-V3\nBase", color="model", bold=True)
    box(ax, 2.6, 4.2, 3.6, 1.0, "GRPO, rule rewards:\naccuracy + format, no SFT", color="stage")
    box(ax, 6.9, 4.2, 1.8, 1.0, "R1-Zero", color="model", bold=True)
    arrow(ax, (1.9, 3.1), (2.6, 4.6))
    arrow(ax, (6.2, 4.7), (6.9, 4.7))
    label(ax, 11.6, 4.7, "long, self-checking chains of thought appear,\nbut they mix languages and are "
          "hard to read", fontsize=8.5, style="italic")
    stages = [("1  cold start", "SFT on thousands of long,\nreadable chains of thought"),
              ("2  reasoning RL", "GRPO: rule rewards +\na language-consistency reward"),
              ("3  rejection sampling", "~600K reasoning + ~200K other\n= 800K samples; SFT of\n"
                                        "V3-Base on them"),
              ("4  RL for all prompts", "rules for reasoning,\nreward models for\nhelpfulness, harmlessness")]
    w, gap = 2.45, 0.3
    for i, (name, body) in enumerate(stages):
        x = 2.6 + i * (w + gap)
        box(ax, x, 1.7, w, 1.9, color="stage")
        label(ax, x + w / 2, 3.3, name, fontsize=9.5)
        label(ax, x + w / 2, 2.45, body, fontsize=8)
        if i:
            arrow(ax, (x - gap, 2.65), (x, 2.65))
    arrow(ax, (1.9, 2.8), (2.6, 2.65))
    x_end = 2.6 + 4 * (w + gap) - gap
    box(ax, x_end + 0.3, 2.15, 0.9, 1.0, "R1", color="model", bold=True)
    arrow(ax, (x_end, 2.65), (x_end + 0.3, 2.65))
    x3 = 2.6 + 2 * (w + gap) + w / 2
    box(ax, x3 - 2.2, 0.2, 4.4, 0.9, "students: Qwen2.5 and Llama, 1.5B to 70B,\nSFT on the 800K samples only, "
        "no RL", color="model")
    arrow(ax, (x3, 1.7), (x3, 1.1), "distillation", text_offset=(0.6, -0.1))
    return fig
