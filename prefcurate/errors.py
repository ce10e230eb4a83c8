"""Error types shared across the package.

:class:`InputError` marks a deterministic problem with what the user gave (a config, an
input file): running it again gives the same failure, so Prefect must not retry it and
the CLI prints it as one ``error:`` line.
"""


class InputError(ValueError):
    """The user's input is unusable as given; retrying cannot help."""
