"""The one history format of every training loop: a list with one metrics dict per step.

Every loop (:func:`refimpl.model.train`, :func:`refimpl.model.sft_train`, :func:`refimpl.rl.grpo_train`,
:func:`refimpl.distill.pipelines.gkd_train`, :func:`refimpl.distill.pipelines.sequence_kd_train`)
appends one dict per optimisation step: ``step`` (1, 2, ...: the steps done after this one), the
method's metrics, and ``seconds``, the wall time of that step.

:class:`History` is a ``list`` of those dicts with two conveniences:

* ``h["loss"]`` (a string index) is the column: a list with that metric of every step (``None``
  where a step lacks it; KeyError if no step has it), so code written for a dict of lists keeps
  working; ``h.keys()``, ``h.items()`` and ``h.columns()`` give all columns.
* ``==`` ignores ``seconds``: two runs with the same seed compare equal, the wall times aside.
  Everything else in a row is a deterministic function of the inputs and the seed.
"""

from __future__ import annotations

#: Row keys that are measurements of the machine, not results: ignored by ``History.__eq__``.
TIMING_KEYS = ("seconds",)

_MISSING = object()


def _strip(rows):
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} if isinstance(r, dict) else r for r in rows]


class History(list):
    """A list of per-step metric dicts; ``h["name"]`` is a column, ``==`` ignores ``seconds``."""

    __slots__ = ()

    def __getitem__(self, key):
        if isinstance(key, str):
            return self.column(key)
        out = super().__getitem__(key)
        return History(out) if isinstance(key, slice) else out

    def column(self, key, default=_MISSING):
        """The metric ``key`` of every step, in order (``default``, else None, where a step lacks it)."""
        if default is _MISSING:
            if not any(key in r for r in self):
                raise KeyError(key)
            default = None
        return [r.get(key, default) for r in self]

    def keys(self):
        """Every metric name, in the order the steps first show them."""
        return list(dict.fromkeys(k for r in self for k in r))

    def items(self):
        """``(name, column)`` pairs, as a dict of lists would give them."""
        return [(k, self.column(k)) for k in self.keys()]

    def columns(self) -> dict:
        """The history as a dict of lists (one per metric), e.g. for JSON or plotting."""
        return dict(self.items())

    def without_timing(self) -> list:
        """The rows without ``seconds``: the deterministic part of the history."""
        return _strip(self)

    @classmethod
    def from_columns(cls, columns: dict) -> History:
        """The inverse of :meth:`columns` (also reads the dict-of-lists histories of older checkpoints)."""
        n = {len(v) for v in columns.values()}
        if len(n) > 1:
            raise ValueError(f"columns: expected lists of one length, got lengths {sorted(n)}")
        keys = list(columns)
        return cls({k: columns[k][i] for k in keys} for i in range(n.pop() if n else 0))

    def __eq__(self, other):
        if not isinstance(other, list):
            return NotImplemented
        return _strip(self) == _strip(other)

    def __ne__(self, other):
        eq = self.__eq__(other)
        return eq if eq is NotImplemented else not eq

    __hash__ = None

    def __repr__(self):
        return f"History({list.__repr__(self)})"
