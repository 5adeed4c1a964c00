"""refimpl's benchmarks. Importing the package sets the OpenMP wait policy first.

torch and numba's ``omp`` layer load the same ``libgomp.so.1`` (measured: one copy mapped in a
process that imports both), and libgomp reads ``OMP_WAIT_POLICY`` once, when it is loaded. If
``import torch`` comes before :mod:`refimpl.backend` sets the policy, numba's workers inherit
torch's default (spinning) policy. Every benchmark entry point (``python -m benchmarks.run``,
``python -m benchmarks.bench_<area>``, the tests importing ``benchmarks.harness``) imports this
package first, so the variable is in the environment before any OpenMP runtime can load.
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "passive")   # refimpl.backend.OMP_WAIT_POLICY
