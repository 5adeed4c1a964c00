r"""A thin MPI communicator wrapper that counts every byte handed to an all-to-all, and agrees on errors.

Expert parallelism moves tokens with ``MPI_Alltoallv`` (DeepSeek-V3 §3.2.2 describes the dispatch
and combine kernels it built for this; here the MPI library is the engine). :class:`Comm` wraps an
``mpi4py`` communicator: every :meth:`Comm.alltoallv` call records, under a label such as
``"dispatch/x"``, the bytes this rank passed for each destination rank, computed from the very
counts and dtype given to MPI. :meth:`Comm.traffic` gathers those records into a
``(ranks, ranks)`` matrix, and :func:`cross_node_bytes` sums the entries whose source and destination
sit on different simulated nodes (ranks ``d`` are grouped as node ``d // devices_per_node``, as in
:func:`refimpl.moe.traffic.expert_placement`).

Distributed code must never leave one rank raising while the others wait in a collective: that
hangs. :meth:`Comm.agree` runs a local check on every rank and all-gathers the outcome, so a bad
input on any rank raises *the same* error on every rank. :meth:`Comm.check_same` compares a
fingerprint of a value (a config, a shape) across ranks the same way.

``mpi4py`` is imported lazily: importing :mod:`refimpl.parallel` works without it.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np

from .._validate import check_integer


def _mpi():
    try:
        from mpi4py import MPI
    except ImportError as e:  # pragma: no cover - exercised only without the extra
        raise ImportError("refimpl.parallel needs mpi4py: pip install 'refimpl[mpi]' (mpi4py + mpich)") from e
    return MPI


def fingerprint(value) -> str:
    """SHA-256 of a JSON rendering of ``value`` (dicts sorted; arrays by dtype, shape and bytes)."""
    def enc(v):
        if isinstance(v, np.ndarray):
            return {"dtype": v.dtype.str, "shape": list(v.shape), "sha": hashlib.sha256(v.tobytes()).hexdigest()}
        if hasattr(v, "to_dict"):
            return enc(v.to_dict())
        if isinstance(v, dict):
            return {str(k): enc(x) for k, x in v.items()}
        if isinstance(v, list | tuple):
            return [enc(x) for x in v]
        if isinstance(v, np.generic):
            return v.item()
        if isinstance(v, float) and not np.isfinite(v):
            return repr(v)
        return v
    return hashlib.sha256(json.dumps(enc(value), sort_keys=True, default=repr).encode()).hexdigest()


class Comm:
    """An mpi4py communicator plus a log of the bytes passed to each all-to-all.

    ``Comm(MPI.COMM_WORLD, devices_per_node=2)``; ``comm.log`` is a list of ``(label, send_bytes)``
    with ``send_bytes`` an (R,) int64 array: bytes this rank passed for each destination rank
    (including itself: the diagonal block is handed to MPI too, but crosses no link).
    """

    def __init__(self, comm=None, devices_per_node=1):
        self.comm = _mpi().COMM_WORLD if comm is None else comm
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        # collective, so that a rank with a different value cannot leave the others waiting later
        values = self.comm.allgather(devices_per_node)
        if any(v != values[0] for v in values):
            raise ValueError(f"devices_per_node: differs across ranks: {values}")
        devices_per_node = check_integer("devices_per_node", devices_per_node, low=1)
        if self.size % devices_per_node:
            raise ValueError(f"devices_per_node: expected a positive divisor of the {self.size} ranks, "
                             f"got {devices_per_node!r}")
        self.devices_per_node = int(devices_per_node)
        self.log = []

    # ---- agreement ---------------------------------------------------------------------------
    def agree(self, fn, *args, **kwargs):
        """Run ``fn`` on every rank; if it raised ValueError/TypeError on any rank, raise on all.

        The error raised everywhere is the lowest failing rank's, with ``(rank r)`` appended, so every
        process reports the same message and none is left waiting in a later collective.
        """
        result, err = None, None
        try:
            result = fn(*args, **kwargs)
        except (ValueError, TypeError) as e:
            err = (type(e).__name__, str(e))
        errs = self.comm.allgather(err)
        bad = [(r, e) for r, e in enumerate(errs) if e is not None]
        if bad:
            r, (kind, msg) = bad[0]
            others = f"; also on rank(s) {[b[0] for b in bad[1:]]}" if len(bad) > 1 else ""
            raise (TypeError if kind == "TypeError" else ValueError)(f"{msg} (rank {r}{others})")
        return result

    def check_same(self, name, value):
        """Raise the same ValueError on every rank unless ``value`` has one fingerprint on all ranks."""
        prints = self.comm.allgather(fingerprint(value))
        differ = [r for r, p in enumerate(prints) if p != prints[0]]
        if differ:
            raise ValueError(f"{name}: differs across ranks: rank(s) {differ} disagree with rank 0 "
                             f"(every rank must pass the same {name})")

    # ---- all-to-all with accounting ----------------------------------------------------------
    def exchange_counts(self, sendcounts, label):
        """``MPI_Alltoall`` of one int64 per destination: how many rows each rank will receive."""
        send = np.ascontiguousarray(sendcounts, dtype=np.int64)           # (R,)
        recv = np.empty(self.size, dtype=np.int64)                        # (R,)
        self.comm.Alltoall(send, recv)
        self.log.append((label, np.full(self.size, send.itemsize, dtype=np.int64)))
        return recv

    def alltoallv(self, send, sendcounts, recvcounts, label):
        """``MPI_Alltoallv`` of rows: ``send`` (S, ...) sorted by destination, ``sendcounts[d]`` rows to
        rank ``d``; returns (sum(recvcounts), ...) rows ordered by source rank.

        The bytes recorded are ``sendcounts * row_size * itemsize``: what the call is told to send.
        """
        send = np.ascontiguousarray(send)
        row = int(np.prod(send.shape[1:], dtype=np.int64))
        sc = np.asarray(sendcounts, dtype=np.int64) * row                 # (R,) elements per destination
        rc = np.asarray(recvcounts, dtype=np.int64) * row                 # (R,)
        recv = np.empty((int(np.sum(recvcounts)),) + send.shape[1:], dtype=send.dtype)
        sd = np.concatenate([[0], np.cumsum(sc)[:-1]])                    # (R,) displacements
        rd = np.concatenate([[0], np.cumsum(rc)[:-1]])                    # (R,)
        from mpi4py.util.dtlib import from_numpy_dtype
        dtype = from_numpy_dtype(send.dtype)
        self.comm.Alltoallv([send, (sc, sd), dtype], [recv, (rc, rd), dtype])
        self.log.append((label, sc * send.itemsize))
        return recv

    def allreduce_sum(self, a):
        """Elementwise sum over ranks of an array (same shape and dtype on every rank)."""
        a = np.ascontiguousarray(a)
        out = np.empty_like(a)
        self.comm.Allreduce(a, out, op=_mpi().SUM)
        return out

    def traffic(self, label=None):
        """(R, R) int64 bytes from source rank (row) to destination rank (column), summed over the log
        entries whose label equals ``label`` (or starts with ``label + "/"``; all entries if None).
        Collective: every rank must call it."""
        mine = np.zeros(self.size, dtype=np.int64)                        # (R,)
        for lab, b in self.log:
            if label is None or lab == label or lab.startswith(label + "/"):
                mine += b
        out = np.empty((self.size, self.size), dtype=np.int64)            # (R, R)
        self.comm.Allgather(mine, out)
        return out

    def labels(self):
        """The distinct labels in the log, in first-use order."""
        return list(dict.fromkeys(lab for lab, _ in self.log))


def cross_node_bytes(matrix, devices_per_node):
    """Bytes of a (R, R) traffic matrix whose source and destination ranks are on different nodes."""
    m = np.asarray(matrix)
    node = np.arange(m.shape[0]) // devices_per_node                      # (R,)
    return int(m[node[:, None] != node[None, :]].sum())


def intra_node_bytes(matrix, devices_per_node):
    """Bytes between different ranks of the same node (the off-diagonal part of each node's block)."""
    m = np.asarray(matrix)
    node = np.arange(m.shape[0]) // devices_per_node                      # (R,)
    same = (node[:, None] == node[None, :]) & ~np.eye(m.shape[0], dtype=bool)
    return int(m[same].sum())
