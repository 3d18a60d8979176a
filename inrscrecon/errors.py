"""Exception and warning types for bad or doubtful user input; the CLI prints each as one line."""


class InputError(ValueError):
    """Bad input. The message names the file, the field and the offending value."""


class InputWarning(UserWarning):
    """Doubtful input that still gives a result (e.g. pixel-like coordinates without a scale).

    The CLI prints it as one line ``inrscrecon: warning: …``."""
