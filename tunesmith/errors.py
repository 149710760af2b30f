"""The project's own error types. The CLI prints them as one line and exits with code 2."""


class TunesmithError(Exception):
    """A problem the user can fix: bad config, bad data, a missing file. Shown without a traceback."""


class ConfigError(TunesmithError):
    """An invalid configuration: unknown key, wrong type, missing file or model."""


class DataError(TunesmithError):
    """Invalid training data; the message names the file, line and field."""


class ModelError(TunesmithError):
    """A model or tokenizer that cannot be loaded safely."""
