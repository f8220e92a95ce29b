"""The one exception type for mistakes a user can make."""


class FmkitError(Exception):
    """A user-facing error: the CLI prints its message as one line and exits non-zero.

    Raise it for bad names, bad option values, unreadable data or checkpoints: anything a user
    can fix without reading a traceback.
    """
