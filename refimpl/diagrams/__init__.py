"""Diagrams of the book, drawn with matplotlib from the configurations they show.

One function per diagram, each returning a matplotlib figure whose sizes are read from
:data:`refimpl.config.PRESETS` or computed by :mod:`refimpl.accounting` and :mod:`refimpl.rl`, so
the pictures cannot drift from the code. matplotlib (the ``book`` extra) is imported only when a
diagram is drawn.
"""

from .architecture import (
    expert_parallel_diagram,
    lineage_diagram,
    mla_diagram,
    moe_diagram,
    mtp_diagram,
)
from .draw import texts
from .training import grpo_diagram, r1_pipeline_diagram

#: Every diagram, by the name the book uses for it.
DIAGRAMS = {
    "lineage": lineage_diagram,
    "mla": mla_diagram,
    "moe": moe_diagram,
    "mtp": mtp_diagram,
    "grpo": grpo_diagram,
    "r1_pipeline": r1_pipeline_diagram,
    "expert_parallel": expert_parallel_diagram,
}

__all__ = ["DIAGRAMS", "expert_parallel_diagram", "grpo_diagram", "lineage_diagram", "mla_diagram",
           "moe_diagram", "mtp_diagram", "r1_pipeline_diagram", "texts"]
