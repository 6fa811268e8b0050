"""Errors sdfast raises for bad input. The CLI prints their message on one line, exit 2."""


class SdfastError(ValueError):
    """Bad input: a file, an argument or a combination that sdfast cannot use."""


class CheckpointError(SdfastError):
    """A checkpoint file that is missing, unreadable, unsafe or not a model sdfast knows."""


class WriteError(SdfastError, OSError):
    """A file that could not be written (full disk, no permission, a folder in the way): one
    line naming the file, exit 2 on the command line, and still an OSError for callers."""
