"""The ground floor: the small closed choices every layer above shares, and the one parser that reads them.

Each choice is a ``str`` enum, so a plain string (from a YAML recipe, a command line, a keyword argument) and the
enum member compare equal and serialise the same; :func:`parse_choice` turns either into the member, or into an
error that lists every valid value. This module imports nothing from fewbit, so the kernels (the floor above)
and everything over them can use it.
"""

from __future__ import annotations

import enum
from typing import TypeVar

__all__ = ["AmaxAlgo", "Overflow", "Rounding", "ScaleMode", "parse_choice"]


class Rounding(str, enum.Enum):
    """How a value between two neighbouring codes is rounded.

    ``nearest_even``: to the nearer code, ties to the code with an even significand (IEEE 754 default).
    ``nearest_away``: to the nearer code, ties away from zero.
    ``toward_zero``: to the code of largest magnitude not above ``|x|`` (truncation).
    ``stochastic``: up with probability equal to the distance from the lower code over the gap (unbiased).
    """

    NEAREST_EVEN = "nearest_even"
    NEAREST_AWAY = "nearest_away"
    TOWARD_ZERO = "toward_zero"
    STOCHASTIC = "stochastic"


class Overflow(str, enum.Enum):
    """What a value beyond the format's largest finite magnitude becomes.

    ``saturate``: the largest finite value of the same sign (also for +-inf inputs).
    ``nonfinite``: +-inf where the format has infinities, else NaN where it has NaN, else saturate.
    """

    SATURATE = "saturate"
    NONFINITE = "nonfinite"


class ScaleMode(str, enum.Enum):
    """How an MX block's E8M0 scale is chosen from the block's amax (the arithmetic is in
    :mod:`fewbit.kernels.e8m0`; :mod:`fewbit.scaling` describes each mode with its trade-offs).

    ``floor``: ``2^(floor(log2(amax)) - emax)`` (OCP MX v1.0, default). ``rceil``: ``2^ceil(log2(amax / max))``
    (NVIDIA hardware; never saturates). ``ceil``: ``2^(ceil(log2(amax)) - emax)``. ``even``: ``floor`` after
    rounding amax to the element's mantissa width.
    """

    FLOOR = "floor"
    RCEIL = "rceil"
    CEIL = "ceil"
    EVEN = "even"


class AmaxAlgo(str, enum.Enum):
    """Which amax a delayed-scaling history gives: ``max`` (the largest in the window) or ``most_recent`` (the
    previous step's)."""

    MAX = "max"
    MOST_RECENT = "most_recent"


Choice = TypeVar("Choice", bound=enum.Enum)


def parse_choice(kind: type[Choice], value: object, what: str) -> Choice:
    """``kind(value)``: the member of enum ``kind`` for ``value`` (a member or its string value).

    Raises ValueError naming the bad value, the choice (``what``: "rounding", "scale_mode", ...) and every valid
    value.
    """
    try:
        return kind(value)
    except ValueError:
        valid = ", ".join(str(m.value) for m in kind)
        raise ValueError(f"unknown {what} {value!r}; valid: {valid}") from None
