"""Errors of the key/value-prefix methods."""

from peftkit import PeftkitError


class PrefixInputError(PeftkitError, ValueError):
    """A call's inputs cannot take the adapter's prefixes (a foreign cache, a 4-D mask, a mask of the wrong length)."""
