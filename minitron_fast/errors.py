"""User-facing errors: one line that names the problem and the fix.

The CLI prints ``error: <message>`` for these and exits non-zero, with no traceback.
"""


class MinitronError(Exception):
    """Bad input or an unmet precondition that the user can fix."""


class UnsupportedModelError(MinitronError, ValueError):
    """A model family minitron_fast has no adapter for."""


class DataError(MinitronError, ValueError):
    """Missing, empty or malformed data."""


class KDInputError(MinitronError, ValueError):
    """Bad input to the KD / CE losses: names the argument and what to pass."""

