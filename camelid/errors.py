"""The one exception type for user mistakes.

A `CamelidError` carries a message meant for the user: it names the file or field at fault and
says what to do. The CLI prints it on one line and exits with code 2; anything else is a bug and
keeps its traceback.
"""


class CamelidError(Exception):
    """A user-facing error: bad path, corrupt file, wrong shapes, bad config key, bad request."""


def fail(where: object, problem: str, fix: str = "") -> "CamelidError":
    """Build a CamelidError of the form '<where>: <problem>[; <fix>]'."""
    text = f"{where}: {problem}"
    if fix:
        text += f"; {fix}"
    return CamelidError(text)
