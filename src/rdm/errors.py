"""The one exception base for errors caused by input: the CLI prints these without a traceback."""


class RdmError(Exception):
    """Bad input or a mismatched artifact; the message names the path or argument and what to do."""


class IdentityMismatch(RdmError):
    """Two artifacts (encoder, database, neighbours, model) of different identities were paired."""
