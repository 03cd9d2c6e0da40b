"""Errors the user can act on (bad data, bad checkpoint, impossible run): the CLI prints them as one line."""


class TrainError(Exception):
    """Something about the run's inputs or state is wrong; the message says what and where."""
