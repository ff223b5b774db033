"""The one exception type users see as a single line (the CLIs print it without a traceback)."""


class SoraError(Exception):
    """A problem with the user's input, config or data, stated in one line.

    The message must name the file, field or option that is wrong and what was expected.
    CLIs catch it, print ``error: <message>`` and exit with status 2.
    """
