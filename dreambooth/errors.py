"""The one exception type for mistakes a user can fix; the CLI prints it as one line and exits 2."""


class UserError(Exception):
    """A problem with the user's input (path, key, value, machine); the message names it and the fix."""


def first_line(error: BaseException) -> str:
    """The first line of an exception's message (libraries' messages run long), or its type when empty."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
