"""Keys the schema does not know: ``+trainer.total_step=5`` is accepted by Hydra (``+`` adds a key)
and dropped silently when the config becomes dataclasses. ``check_known_keys`` refuses them,
naming the nearest valid keys."""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Mapping

from .schema import Config, ConfigError


def schema_keys(schema: type = Config, prefix: str = "") -> list[str]:
    """Every dotted key of the schema, sections and leaves (``trainer``, ``trainer.total_steps``, ...)."""
    keys = []
    for f in dataclasses.fields(schema):
        key = prefix + f.name
        keys.append(key)
        nested = f.default_factory if f.default_factory is not dataclasses.MISSING else None
        if nested is not None and dataclasses.is_dataclass(nested):
            keys.extend(schema_keys(nested, key + "."))
    return keys


def unknown_keys(config: Mapping, schema: type = Config, prefix: str = "") -> list[str]:
    """Dotted keys of ``config`` (a plain or OmegaConf mapping) that ``schema`` has no field for."""
    fields = {f.name: f for f in dataclasses.fields(schema)}
    found = []
    for name, value in config.items():
        key = prefix + str(name)
        if name not in fields:
            found.append(key)
            continue
        nested = fields[name].default_factory
        if nested is not dataclasses.MISSING and dataclasses.is_dataclass(nested) and isinstance(value, Mapping):
            found.extend(unknown_keys(value, nested, key + "."))
    return found


def check_known_keys(config: Mapping | None) -> None:
    """Raise ``ConfigError`` for the first key of the composed config (before it becomes dataclasses)
    that the schema does not know, with the nearest valid keys."""
    if config is None:
        return
    unknown = unknown_keys(config)
    if not unknown:
        return
    key = unknown[0]
    nearest = nearest_keys(key)
    hint = f"did you mean {' or '.join(nearest)}?" if nearest else "see spmd_rlhf/config/schema.py for the keys;"
    more = f" (and {len(unknown) - 1} more unknown: {', '.join(unknown[1:4])})" if len(unknown) > 1 else ""
    raise ConfigError(f"{key} is not a configuration key{more}; {hint} Remove it or fix its name")


def nearest_keys(key: str, limit: int = 3) -> list[str]:
    """Valid keys close to ``key``: fields of the same section whose names are close (or share a
    prefix), else that section's fields, else (no such section) the closest dotted keys anywhere."""
    valid = schema_keys()
    section, _, name = key.rpartition(".")
    siblings = {k.rpartition(".")[2]: k for k in valid if k.rpartition(".")[0] == section}
    close = difflib.get_close_matches(name, list(siblings), n=limit, cutoff=0.6)
    close += [s for s in siblings if s not in close and (s.startswith(name) or name.startswith(s))]
    if close:
        return [siblings[s] for s in close[:limit]]
    if siblings:
        return list(siblings.values())[:8]
    return difflib.get_close_matches(key, valid, n=limit, cutoff=0.6)
