"""Numba twins of the NumPy reference's hot loops.

Each ``<area>_nb.py`` module mirrors a NumPy function's signature and is selected through
``backend=`` (see :mod:`refimpl.backend`). Modules here import numba at import time, so they are
only imported lazily, by :func:`refimpl.backend.kernel`, on the first call that needs them.
"""
