"""One error type for everything the user can get wrong.

The CLI turns an :class:`EstaError` into a single ``esta: error: ...`` line and exit code 2; any other exception is
a bug in esta and keeps its traceback.
"""


class EstaError(Exception):
    """Bad input: a missing file, a mismatched family, an empty dataset, an impossible budget."""
