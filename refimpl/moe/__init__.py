"""DeepSeekMoE: routers, sparse dispatch, the MoE layer, load balancing and simulated expert parallelism.

Modules: :mod:`~refimpl.moe.gating` (V2 softmax / V3 sigmoid + bias routers, Mixtral-style router),
:mod:`~refimpl.moe.gates` (the router table: ``config.gate_type`` picks one),
:mod:`~refimpl.moe.dispatch` (permute by expert, per-expert GEMMs, combine, token dropping),
:mod:`~refimpl.moe.layer` (forward and hand-written backward of the whole layer),
:mod:`~refimpl.moe.balance` (V2 auxiliary losses, V3 sequence-wise loss and bias update),
:mod:`~refimpl.moe.traffic` (simulated expert parallelism: per-device load and all-to-all volume for
an expert placement; the real MPI version is :mod:`refimpl.parallel`),
:mod:`~refimpl.moe.params` (initialisation, checkpoint layouts, total vs active parameters).
"""

from .balance import (
    balance_backward,
    bias_update,
    comm_balance_forward,
    device_balance_forward,
    expert_balance_forward,
    expert_load,
    max_violation,
    seq_balance_forward,
)
from .dispatch import capacity_keep, combine, dispatch, experts_backward, experts_forward, make_plan
from .gates import GATES, Gate, get_gate, register_gate
from .gating import (
    Routing,
    check_gate_params,
    gate_backward,
    gate_forward,
    mixtral_gate_backward,
    mixtral_gate_forward,
    select_experts,
)
from .layer import moe_backward, moe_forward
from .params import (
    count_parameters,
    experts_from_fused,
    experts_from_list,
    experts_to_list,
    init_moe_params,
    permute_experts,
    split_shared_experts,
)
from .traffic import all_to_all_stats, expert_placement, node_limited_comparison

__all__ = [
    "Routing", "gate_forward", "gate_backward", "mixtral_gate_forward", "mixtral_gate_backward",
    "select_experts", "make_plan", "dispatch", "combine", "experts_forward", "experts_backward",
    "capacity_keep", "moe_forward", "moe_backward", "expert_balance_forward", "device_balance_forward",
    "comm_balance_forward", "seq_balance_forward", "balance_backward", "bias_update", "expert_load",
    "max_violation", "expert_placement", "all_to_all_stats", "node_limited_comparison", "init_moe_params",
    "experts_from_list", "experts_to_list", "experts_from_fused", "permute_experts", "split_shared_experts",
    "count_parameters", "GATES", "Gate", "get_gate", "register_gate", "check_gate_params",
]
