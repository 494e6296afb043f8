"""The one exception type for problems the user can fix (bad input, missing data)."""


class UserError(Exception):
    """A problem with the user's input or environment, not a bug.

    Scripts catch it, print its message (what went wrong, where, how to fix it)
    and exit with code 2, without a traceback.
    """

    exit_code = 2
