"""Typed views of the Hydra config nodes (OmegaConf -> dataclasses), with clear errors.

Each config group maps to one dataclass next to the code it configures; this module only converts.
"""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

from omegaconf import DictConfig, OmegaConf

T = TypeVar("T")


class ConfigError(ValueError):
    pass


def to_dict(node: Any) -> dict:
    if node is None:
        return {}
    if not isinstance(node, DictConfig):
        node = OmegaConf.create(dict(node))  # plain dicts may still hold DictConfig values
    return OmegaConf.to_container(node, resolve=True)  # type: ignore[return-value]


def typed(cls: type[T], node: Any, where: str, ignore: tuple[str, ...] = ()) -> T:
    """Build dataclass `cls` from a config node; unknown keys are an error naming the node."""
    data = {k: v for k, v in to_dict(node).items() if k not in ignore}
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; known: {sorted(names)}")
    return cls(**data)


def positive(value: int, name: str) -> int:
    if not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    return value
