"""Parsers for the budgets users type: ``10ms``, ``800us``, ``8MB``, ``1%``, ``10min``."""

from __future__ import annotations

import math
import re

from edgecompress.core.errors import UsageError

_NUMBER = r"([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)"

_TIME_UNITS_MS = {"us": 1e-3, "µs": 1e-3, "ms": 1.0, "s": 1e3}
_DURATION_UNITS_S = {"s": 1.0, "sec": 1.0, "min": 60.0, "m": 60.0, "h": 3600.0}
_SIZE_UNITS_BYTES = {
    "b": 1,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
}


def _split(text: str, what: str, example: str) -> tuple[float, str]:
    if not isinstance(text, str):
        raise UsageError(f"{what} must be text like {example!r}, got {text!r}")
    match = re.fullmatch(_NUMBER + r"\s*([a-zA-Zµ%]*)", text.strip())
    if not match:
        raise UsageError(f"cannot read {what} {text!r}; write it like {example!r}")
    value = float(match.group(1))
    if not math.isfinite(value):
        raise UsageError(f"{what} {text!r} is not a finite number")
    return value, match.group(2)


def parse_latency_ms(text: str) -> float:
    """``'10ms'``, ``'0.5 ms'``, ``'800us'``, ``'1.2s'`` -> milliseconds (> 0)."""
    value, unit = _split(text, "latency budget", "10ms")
    unit = unit.lower() if unit != "µs" else unit
    if unit not in _TIME_UNITS_MS:
        raise UsageError(
            f"latency budget {text!r} needs a unit: us, ms or s (for example '10ms')"
        )
    latency_ms = value * _TIME_UNITS_MS[unit]
    if latency_ms <= 0:
        raise UsageError(f"latency budget {text!r} must be greater than zero")
    return latency_ms


def parse_size_bytes(text: str) -> int:
    """``'8MB'``, ``'512KiB'``, ``'2 GB'`` -> bytes (> 0). Decimal and binary units."""
    value, unit = _split(text, "memory budget", "8MB")
    key = unit.lower()
    if key not in _SIZE_UNITS_BYTES:
        raise UsageError(
            f"memory budget {text!r} needs a unit: B, KB, MB, GB, KiB, MiB or GiB"
        )
    size = value * _SIZE_UNITS_BYTES[key]
    if size < 1:
        raise UsageError(f"memory budget {text!r} must be at least one byte")
    return int(round(size))


def parse_fraction(text: str) -> float:
    """``'1%'`` or ``'0.01'`` -> 0.01. A share in [0, 1]."""
    value, unit = _split(text, "accuracy drop", "1%")
    if unit == "%":
        value /= 100.0
    elif unit:
        raise UsageError(f"accuracy drop {text!r}: write a percentage ('1%') or a share ('0.01')")
    if not 0.0 <= value <= 1.0:
        raise UsageError(f"accuracy drop {text!r} must lie between 0% and 100%")
    return value


def parse_duration_s(text: str) -> float:
    """``'10min'``, ``'90s'``, ``'1.5h'`` -> seconds (> 0): a wall-time budget."""
    value, unit = _split(text, "time budget", "10min")
    key = unit.lower()
    if key not in _DURATION_UNITS_S:
        raise UsageError(f"time budget {text!r} needs a unit: s, min or h (for example '10min')")
    seconds = value * _DURATION_UNITS_S[key]
    if seconds <= 0:
        raise UsageError(f"time budget {text!r} must be greater than zero")
    return seconds
