"""User-facing errors.

Owns the one exception type the CLI turns into a single line on stderr and an exit code.
Never carries a traceback to a user: anything else escaping the CLI is a bug.
"""

EXIT_REFUSED = 1
EXIT_USAGE = 2


class DeskfsError(Exception):
    """An error a user caused or can fix; printed as one line."""

    def __init__(self, message: str, exit_code: int = EXIT_REFUSED) -> None:
        super().__init__(message)
        self.exit_code = exit_code
