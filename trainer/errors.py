"""Errors the user can act on (bad config, bad data, bad checkpoint, impossible run): the CLI prints them as one line."""


class TrainError(Exception):
    """Something about the run's inputs or state is wrong; the message says what and where."""


class ConfigError(Exception):
    """A config file is invalid; the message names the file and the key."""
