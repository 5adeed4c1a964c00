"""Public testing kit: gradient checking, tolerances and hypothesis strategies.

``strategies`` needs hypothesis (the ``test`` extra) and is imported on demand:
``from refimpl.testing import strategies``.
"""

from ..tree import tree_flatten
from .gradcheck import check_grad
from .tolerances import TOLERANCES, tol

__all__ = ["check_grad", "tree_flatten", "TOLERANCES", "tol"]
