"""One exception type for every input a user can get wrong.

The message is a single line naming the culprit (file, key, flag, node); the CLI prints it
as `error: <message>` and exits non-zero, without a traceback.
"""


class NanoForgeError(Exception):
    """A user-facing error with a one-line message."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))
