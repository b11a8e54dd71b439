"""The recipe's own failure type, importable without torch (the entry point reports it)."""


class TrainingError(Exception):
    """A failure with a message meant for the job's user: one line, no traceback needed."""
