"""One exception type for mistakes a user can fix; the CLI turns it into one line and exit code 2."""


class DynTSError(Exception):
    """Bad input or an unusable resource: the message says what to change."""
