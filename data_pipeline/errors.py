"""Errors the user can act on. The CLI prints a `PipelineError` as one line and exits non-zero."""


class PipelineError(Exception):
    """Bad config, missing or unreadable input, unwritable output: the message names the thing."""


class InputError(PipelineError):
    """One input file cannot be read as a whole: that task fails, the rest of the run goes on."""
