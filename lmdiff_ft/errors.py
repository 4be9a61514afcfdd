"""The one exception type for mistakes a user can fix: the CLI prints it as one line and exits 2."""


class UserError(Exception):
    """A bad input (path, file, field, value). The message names it and says what was expected."""


def first_line(exc: Exception) -> str:
    """Another library's error, shortened to what a one-line message can carry."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
