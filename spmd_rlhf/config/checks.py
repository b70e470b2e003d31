"""The small checks validation is built of; each raises ``ConfigError`` naming the key and a fix."""

from __future__ import annotations

from .schema import ConfigError


def positive(value: float, key: str, allow_zero: bool = False) -> None:
    """``value > 0`` (or ``>= 0`` with ``allow_zero``)."""
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        kind = "non-negative" if allow_zero else "positive"
        raise ConfigError(f"{key}={value} must be {bound}; set {key}=<a {kind} value>")


def choice(value: str, key: str, choices: tuple[str, ...]) -> None:
    """``value`` is one of ``choices``."""
    if value not in choices:
        raise ConfigError(f"{key}={value!r} is not one of {list(choices)}; set {key}=<one of them>")


def divides(divisor: int, total: int, div_key: str, total_key: str, hint: str = "") -> None:
    """``divisor`` divides ``total``; the fix is a multiple of ``divisor`` for ``total_key``."""
    if total % divisor != 0:
        raise ConfigError(
            f"{total_key}={total} is not divisible by {div_key}={divisor}; choose {total_key} as a multiple of "
            f"{divisor}{hint}"
        )


def in_range(value: float, key: str, low: float, high: float, fix: str) -> None:
    """``low <= value <= high``."""
    if not low <= value <= high:
        raise ConfigError(f"{key}={value} must be in [{low}, {high}]; {fix}")
