"""User-facing errors.

Every problem caused by the user's input (a missing file, a bad column, an unknown model) is
raised as :class:`LlamarecError` with a one-line message that names the file, field or value
and says what was expected. The CLI prints that line without a traceback and exits non-zero.
"""


class LlamarecError(Exception):
    """An error the user can fix; its message is one self-contained line."""
