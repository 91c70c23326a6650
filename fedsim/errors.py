"""The one error type for bad input: the CLI prints its message on one line and exits with code 2."""


class UsageError(ValueError):
    """Bad input from the user: a config value, a path, a name. The message says what was wrong and what is valid."""
