"""One error type for every bad input safesub can meet.

Contract: a `SafesubError` carries a single line that names the thing (a checkpoint, a file, a prompt set,
a setting) and the problem. The CLI prints it as ``error: <message>`` and exits with status 2; the app shows it
in an error box. Anything else that escapes is a bug, not a user mistake.
"""
import math


class SafesubError(ValueError):
    """A user-facing problem with an input: ``str(err)`` is one line naming the thing and the problem."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


def finite_number(value, what: str) -> float:
    """`value` as a finite float, else a one-line SafesubError naming `what` (the setting, slider or option)."""
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise SafesubError(f"{what} {value!r}: not a number") from None
    if not math.isfinite(x):
        raise SafesubError(f"{what} {value}: must be a finite number")
    return x
