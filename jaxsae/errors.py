"""The one exception type users see: the CLI prints it as a single line and exits non-zero."""


class JaxsaeError(Exception):
    """Bad input (config, data, flags, files). The message names the culprit."""


class ConfigError(JaxsaeError):
    """A config key is unknown, has the wrong type, or an impossible value."""


class DataError(JaxsaeError):
    """A data directory, manifest or shard does not match the format."""


class NonFiniteError(JaxsaeError):
    """Training produced a non-finite loss or gradient."""
