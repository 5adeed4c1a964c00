"""Tiny pytree helpers for nested parameter dicts (dicts / lists / tuples of arrays).

Parameters and their gradients are nested dicts keyed by HF checkpoint names; these helpers walk
them without a framework.
"""

from __future__ import annotations


def tree_flatten(tree):
    """Flatten nested dicts / lists / tuples into (leaves, rebuild); NamedTuples are leaves."""
    if isinstance(tree, dict):
        keys = list(tree)
        parts = [tree_flatten(tree[k]) for k in keys]
        leaves = [leaf for p in parts for leaf in p[0]]

        def rebuild(xs):
            out, i = {}, 0
            for k, (ls, rb) in zip(keys, parts, strict=True):
                out[k] = rb(xs[i:i + len(ls)])
                i += len(ls)
            return out
        return leaves, rebuild
    if isinstance(tree, list | tuple) and not hasattr(tree, "_fields"):
        parts = [tree_flatten(t) for t in tree]
        leaves = [leaf for p in parts for leaf in p[0]]
        kind = type(tree)

        def rebuild(xs):
            out, i = [], 0
            for ls, rb in parts:
                out.append(rb(xs[i:i + len(ls)]))
                i += len(ls)
            return kind(out)
        return leaves, rebuild
    return [tree], lambda xs: xs[0]


def tree_map(fn, tree, *rest):
    """Apply ``fn`` leaf-wise to one or more trees of the same structure."""
    leaves, rebuild = tree_flatten(tree)
    others = [tree_flatten(r)[0] for r in rest]
    for i, o in enumerate(others):
        if len(o) != len(leaves):
            raise ValueError(f"rest[{i}]: expected a tree with {len(leaves)} leaves, got {len(o)}")
    return rebuild([fn(*xs) for xs in zip(leaves, *others, strict=True)])


def tree_paths(tree, prefix=""):
    """Dotted paths of the leaves, in :func:`tree_flatten` order (``"layers.0.mlp.gate_proj"``)."""
    if isinstance(tree, dict):
        return [p for k in tree for p in tree_paths(tree[k], f"{prefix}{k}.")]
    if isinstance(tree, list | tuple) and not hasattr(tree, "_fields"):
        return [p for i, t in enumerate(tree) for p in tree_paths(t, f"{prefix}{i}.")]
    return [prefix[:-1]]
