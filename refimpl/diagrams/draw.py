"""Boxes, arrows and labels on an empty matplotlib canvas: the few shapes the book's diagrams need.

The canvas is measured in inches (1 unit = 1 inch of the figure), so a label's font size and a
box's size relate the same way on every diagram. matplotlib is imported when a canvas is made, not
when refimpl is imported (it is a dependency of the book, not of the library).
"""

from __future__ import annotations

#: Fill colours by role, shared by every diagram (colour-blind-safe pastel pairs).
COLORS = {
    "input": "#f2f2f2",      # activations entering a block
    "weight": "#dbe9f6",     # a projection or a learned module
    "cache": "#fde0b6",      # what is stored between decoding steps
    "rope": "#e5d8f0",       # rotary position channels
    "expert": "#d9f0d3",     # an expert, a selected item
    "idle": "#ffffff",       # an item that is not selected
    "stage": "#dbe9f6",      # a training stage
    "data": "#fde0b6",       # a data set
    "model": "#d9f0d3",      # a released model
    "note": "#fffbe6",       # an explanation box
}


def canvas(width: float, height: float, title: str | None = None):
    """A figure of ``width`` x ``height`` inches with axes in inch units and no frame: ``(fig, ax)``."""
    if not (width > 0 and height > 0):
        raise ValueError(f"width, height: expected positive sizes in inches, got {width!r}, {height!r}")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(width, height))
    fig.subplots_adjust(0, 0, 1, 1)
    ax.set_xlim(0, width)
    ax.set_ylim(0, height)
    ax.set_aspect("equal")
    ax.axis("off")
    if title:
        ax.text(width / 2, height - 0.2, title, ha="center", va="top", fontsize=12, fontweight="bold")
    return fig, ax


def box(ax, x: float, y: float, w: float, h: float, text: str = "", *, color: str = "weight",
        fontsize: float = 9, dashed: bool = False, bold: bool = False):
    """A rounded box with its lower-left corner at (x, y) and ``text`` centred in it; returns the patch."""
    from matplotlib.patches import FancyBboxPatch

    patch = FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0,rounding_size=0.06",
                           facecolor=COLORS.get(color, color), edgecolor="#333333",
                           linewidth=1.0, linestyle="--" if dashed else "-")
    ax.add_patch(patch)
    if text:
        ax.text(x + w / 2, y + h / 2, text, ha="center", va="center", fontsize=fontsize,
                fontweight="bold" if bold else "normal", linespacing=1.25)
    return patch


def arrow(ax, start: tuple[float, float], end: tuple[float, float], text: str = "", *,
          color: str = "#333333", fontsize: float = 8, dashed: bool = False, text_offset=(0.0, 0.12)):
    """An arrow from ``start`` to ``end`` with an optional label at its middle."""
    ax.annotate("", xy=end, xytext=start,
                arrowprops=dict(arrowstyle="-|>", color=color, lw=1.1, shrinkA=0, shrinkB=0,
                                linestyle="--" if dashed else "-", mutation_scale=11))
    if text:
        mx, my = (start[0] + end[0]) / 2 + text_offset[0], (start[1] + end[1]) / 2 + text_offset[1]
        ax.text(mx, my, text, ha="center", va="bottom", fontsize=fontsize, color=color)


def label(ax, x: float, y: float, text: str, *, fontsize: float = 8, ha: str = "center", color: str = "#333333",
          style: str = "normal"):
    """Free text at (x, y)."""
    ax.text(x, y, text, ha=ha, va="center", fontsize=fontsize, color=color, style=style, linespacing=1.25)


def texts(fig) -> list[str]:
    """Every string drawn on ``fig`` (the tests read a diagram's labels with it)."""
    return [t.get_text() for ax in fig.axes for t in ax.texts if t.get_text()]
