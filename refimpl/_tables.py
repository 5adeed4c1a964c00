"""What the variant tables share (GRPO loss types, MoE gates, distillation divergences): registering an
entry, looking one up by name with an error naming the config field, and checking an entry's options."""

from __future__ import annotations

from collections.abc import Mapping


def register_entry(table: dict, entry, cls: type):
    """Add (or replace) ``entry`` (a ``cls``) under ``entry.name``; return it."""
    if not isinstance(entry, cls):
        raise TypeError(f"entry: expected a {cls.__name__}, got {type(entry).__name__}")
    table[entry.name] = entry
    return entry


def table_entry(table: dict, name, field: str):
    """``table[name]``, or a ValueError naming ``field`` and the names the table holds."""
    if not isinstance(name, str) or name not in table:
        raise ValueError(f"{field}: expected one of {tuple(table)}, got {name!r}")
    return table[name]


def entry_options(declared: Mapping, options, field: str, owner: str) -> dict:
    """``declared`` (an entry's options and defaults) updated with ``options``; unknown names raise a
    ValueError naming ``field`` and ``owner`` (e.g. ``"loss_type='sapo'"``)."""
    options = {} if options is None else options
    if not isinstance(options, Mapping):
        raise TypeError(f"{field}: expected a dict, got {type(options).__name__}")
    unknown = sorted(set(options) - set(declared))
    if unknown:
        raise ValueError(f"{field}: {unknown} are not options of {owner} (it takes {sorted(declared)})")
    return {**declared, **options}
