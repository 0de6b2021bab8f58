"""Errors peftkit raises. Each message says what was wrong and what to do."""


class PeftkitError(Exception):
    """Base class of every peftkit error."""


class MethodNotInstalledError(PeftkitError):
    """No installed plugin implements the requested method."""


class PluginError(PeftkitError):
    """A plugin failed to load or two plugins claim the same method."""


class ConfigError(PeftkitError, ValueError):
    """An adapter config is invalid or cannot be read."""


class InjectError(PeftkitError, ValueError):
    """An adapter cannot be added to this model (e.g. no target module matched)."""


class AdapterLoadError(PeftkitError):
    """Adapter files are missing, corrupt, or do not fit the model."""


class MergeError(PeftkitError):
    """A merge, unmerge or unload was asked for that cannot be done."""
