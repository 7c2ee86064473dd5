"""The one exception type users see: the CLI prints its message as a single line and exits with code 2."""


class SoftpromptError(Exception):
    """Bad input or a mismatch the user can fix; the message says what is wrong and what to do."""
