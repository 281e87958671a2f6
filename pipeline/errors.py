"""The one exception type that reaches the user as a single line."""


class PcdError(Exception):
    """A problem with the user's input: the CLI prints its message on one line and exits non-zero.

    The message must name the file (or scene) and what is wrong with it.
    """
