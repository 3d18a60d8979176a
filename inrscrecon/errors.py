"""One exception type for bad user input; the CLI prints its message and exits without a traceback."""


class InputError(ValueError):
    """Bad input. The message names the file, the field and the offending value."""
