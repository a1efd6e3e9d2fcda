"""One error type for every bad input safesub can meet.

Contract: a `SafesubError` carries a single line that names the thing (a checkpoint, a file, a prompt set,
a setting) and the problem. The CLI prints it as ``error: <message>`` and exits with status 2; the app shows it
in an error box. Anything else that escapes is a bug, not a user mistake.
"""


class SafesubError(ValueError):
    """A user-facing problem with an input: ``str(err)`` is one line naming the thing and the problem."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))
