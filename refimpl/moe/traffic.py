r"""Expert-parallel traffic, simulated: where routed tokens travel for a placement of experts on devices.

Only counts, no MPI: :mod:`refimpl.parallel` runs expert parallelism for real over MPI ranks.

With expert parallelism each device holds ``E / n_devices`` routed experts, and every token is sent
(all-to-all *dispatch*) to the devices holding its K experts, then the outputs come back (*combine*).
Within a node devices talk over NVLink; across nodes over InfiniBand, about 3.2x slower in the H800
cluster of DeepSeek-V3 (§3.2.2, 160 vs 50 GB/s). Hence:

* V2 limits each token to experts on at most ``M = 3`` devices (device-limited routing, §2.2.2);
* V3 limits each token to at most ``M = 4`` of 8 nodes, chosen by the sum of the 2 best scores on
  each node (node-limited routing, §2.1.2), and sends a token **once per target node** over IB,
  where it is forwarded over NVLink to the devices holding its experts (§3.2.2).

Experts are placed contiguously: expert ``e`` lives on device ``e // (E / n_devices)``, device
``d`` on node ``d // devices_per_node``; with ``n_group`` = nodes, a routing group is a node.
:func:`all_to_all_stats` counts per-device load and the tokens that cross node boundaries with and
without node-level de-duplication; :func:`node_limited_comparison` routes the same tokens with and
without the group limit. Only counts are simulated: no timing model.
"""

from __future__ import annotations

import numpy as np

from .._validate import check_int
from .gating import check_router_config, gate_forward


def expert_placement(n_experts, n_devices, devices_per_node=1):
    """Contiguous placement. Returns device_of_expert (E,) and node_of_device (n_devices,) int64."""
    if n_devices < 1 or n_experts % n_devices:
        raise ValueError(f"n_devices: expected a divisor of the {n_experts} experts, got {n_devices}")
    if devices_per_node < 1 or n_devices % devices_per_node:
        raise ValueError(f"devices_per_node: expected a divisor of n_devices ({n_devices}), got {devices_per_node}")
    device_of_expert = np.arange(n_experts) // (n_experts // n_devices)   # (E,)
    node_of_device = np.arange(n_devices) // devices_per_node             # (n_devices,)
    return device_of_expert.astype(np.int64), node_of_device.astype(np.int64)


def all_to_all_stats(idx, n_experts, n_devices, devices_per_node=1, *, token_device=None, hidden_size=None,
                     bytes_per_value=1):
    r"""Dispatch traffic and load for routed tokens ``idx`` under a contiguous expert placement.

    Tokens start on ``token_device`` (default: the N tokens split into contiguous equal blocks, one
    per device, as in data-parallel attention). A token needs one copy on every distinct device that
    holds one of its experts (none for its own device). Across nodes, V3's dispatch sends one copy
    per distinct remote *node* and fans it out over NVLink (``cross_node_tokens``); sending one
    copy per remote device instead gives ``cross_node_tokens_per_device``.

    Returns a dict of int64 arrays / ints / floats:
    ``device_load`` (n_devices,) expert-token pairs computed per device; ``device_tokens``
    (n_devices,) distinct tokens received; ``a2a_tokens`` (n_devices, n_devices) copies from source to
    destination device (diagonal: stays local); ``nodes_per_token`` (N,) distinct nodes holding a
    token's experts; ``max_nodes_per_token``, ``mean_nodes_per_token``; ``cross_node_tokens``,
    ``cross_node_tokens_per_device``, ``intra_node_tokens`` (copies to other devices on the home
    node); with ``hidden_size``, ``cross_node_bytes`` = cross_node_tokens * hidden_size *
    bytes_per_value (V3 dispatches in FP8: 1 byte per value).
    """
    device_of_expert, node_of_device = expert_placement(n_experts, n_devices, devices_per_node)
    idx = check_int("idx", idx, low=0, high=n_experts)
    if idx.ndim != 2:
        raise ValueError(f"idx: expected shape (N, K), got {idx.shape}")
    n = idx.shape[0]
    n_nodes = n_devices // devices_per_node
    if token_device is None:
        token_device = np.arange(n) * n_devices // max(n, 1)              # (N,)
    token_device = check_int("token_device", token_device, low=0, high=n_devices)
    if token_device.shape != (n,):
        raise ValueError(f"token_device: expected shape ({n},), got {token_device.shape}")
    dst_dev = device_of_expert[idx]                                       # (N, K)
    sent_dev = np.zeros((n, n_devices), dtype=bool)                       # (N, n_devices)
    np.put_along_axis(sent_dev, dst_dev, True, axis=1)
    sent_node = np.zeros((n, n_nodes), dtype=bool)                        # (N, n_nodes)
    np.put_along_axis(sent_node, node_of_device[dst_dev], True, axis=1)
    home_node = node_of_device[token_device]                              # (N,)
    remote_dev = sent_dev & (node_of_device[None, :] != home_node[:, None])  # (N, n_devices)
    remote_node = sent_node & (np.arange(n_nodes)[None, :] != home_node[:, None])  # (N, n_nodes)
    local_other = sent_dev & (node_of_device[None, :] == home_node[:, None])  # (N, n_devices)
    local_other[np.arange(n), token_device] = False
    src = np.zeros((n, n_devices), dtype=np.int64)                        # (N, n_devices) one-hot source
    src[np.arange(n), token_device] = 1
    nodes = sent_node.sum(axis=1)                                         # (N,)
    out = {
        "device_load": np.bincount(dst_dev.reshape(-1), minlength=n_devices).astype(np.int64),
        "device_tokens": sent_dev.sum(axis=0).astype(np.int64),
        "a2a_tokens": src.T @ sent_dev.astype(np.int64),                  # (n_devices, n_devices)
        "nodes_per_token": nodes.astype(np.int64),
        "max_nodes_per_token": int(nodes.max(initial=0)),
        "mean_nodes_per_token": float(nodes.mean()) if n else 0.0,
        "cross_node_tokens": int(remote_node.sum()),
        "cross_node_tokens_per_device": int(remote_dev.sum()),
        "intra_node_tokens": int(local_other.sum()),
    }
    if hidden_size is not None:
        out["cross_node_bytes"] = out["cross_node_tokens"] * int(hidden_size) * int(bytes_per_value)
    return out


def node_limited_comparison(x, gate_params, config, n_devices, devices_per_node, **kwargs):
    """Route ``x`` with the config's group limit and without it (``topk_group = n_group``); return
    ``{"limited": stats, "unlimited": stats}`` from :func:`all_to_all_stats` (``kwargs`` go there).

    Groups must coincide with nodes: ``n_group == n_devices // devices_per_node``.
    """
    check_router_config(config)
    if config.n_group != n_devices // max(devices_per_node, 1):
        raise ValueError(f"config.n_group: expected one group per node ({n_devices // max(devices_per_node, 1)}), "
                         f"got {config.n_group}")
    out = {}
    for name, cfg in (("limited", config), ("unlimited", config.replace(topk_group=config.n_group))):
        routing, _ = gate_forward(x, gate_params, cfg)
        out[name] = all_to_all_stats(routing.idx, config.n_routed_experts, n_devices, devices_per_node,
                                     hidden_size=x.shape[-1], **kwargs)
    return out
