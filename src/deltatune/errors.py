"""Exceptions deltatune raises on bad input. Each message is one line naming the problem and the fix."""


class DeltaTuneError(Exception):
    """Base class of every error deltatune raises on purpose (the CLI prints these in one line)."""


class ConfigError(DeltaTuneError, ValueError):
    """A configuration value is invalid or unsupported."""


class TargetError(DeltaTuneError, ValueError):
    """``target_modules`` selects nothing, or selects a module that cannot be adapted."""


class AdapterLoadError(DeltaTuneError, ValueError):
    """An adapter file does not fit the model it is loaded into."""


class MergeError(DeltaTuneError, ValueError):
    """A merge was refused (non-finite weights, or a method that cannot be merged)."""


class DataError(DeltaTuneError, ValueError):
    """A data file cannot be read, or one of its rows does not fit its format (names the file and row)."""


class InputError(DeltaTuneError, ValueError):
    """The arguments of a forward call do not fit the active adapter (names the argument and the fix)."""


class SaveError(DeltaTuneError, OSError):
    """A file or folder could not be written (e.g. the disk is full); the previous version is kept."""
