"""Scaling out over MPI: expert-parallel DeepSeekMoE and data-parallel training, equal to one process.

Modules: :mod:`~refimpl.parallel.comm` (an mpi4py communicator wrapper that logs the bytes of every
all-to-all and raises bad input on every rank at once), :mod:`~refimpl.parallel.mpi_moe` (the
expert-parallel MoE layer: ``Alltoallv`` dispatch and combine, hand-written backward),
:mod:`~refimpl.parallel.data_parallel` (gradient all-reduce with global normalisation and V3's
bias update from the global load), :mod:`~refimpl.parallel.launch` (``mpiexec`` from Python) and
:mod:`~refimpl.parallel.worker` (the ``mpiexec -n k python -m refimpl.parallel.worker`` entry points
that the tests, the benchmark and the "Expert parallelism" chapter run).

Needs the ``mpi`` extra (``pip install 'refimpl[mpi]'``: mpi4py and the mpich wheel); importing this
package does not import mpi4py.
"""

from .comm import Comm, cross_node_bytes, fingerprint, intra_node_bytes
from .data_parallel import allreduce_tree, dp_train, dp_train_step, globalize_loss_cache, local_rows
from .launch import find_mpiexec, mpi_available, run_mpi
from .mpi_moe import ep_moe_backward, ep_moe_forward, shard_experts, shard_params

__all__ = [
    "Comm", "cross_node_bytes", "intra_node_bytes", "fingerprint", "ep_moe_forward", "ep_moe_backward",
    "shard_experts", "shard_params", "dp_train", "dp_train_step", "allreduce_tree", "globalize_loss_cache",
    "local_rows", "find_mpiexec", "mpi_available", "run_mpi",
]
