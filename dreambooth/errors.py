"""The one exception type for mistakes a user can fix; the CLI prints it as one line and exits 2."""


class UserError(Exception):
    """A problem with the user's input (path, key, value, machine); the message names it and the fix."""
