"""Exceptions that carry a message meant for the user, not a traceback."""


class UserInputError(ValueError):
    """Bad input from the user: a file, a column, an option, a checkpoint.

    Messages say what was expected, what was found, and how to fix it. The command-line
    entry points print them without a traceback and exit with status 2.
    """


class TrainingError(RuntimeError):
    """Training cannot go on (for example a non-finite loss). The last good checkpoint is kept."""
