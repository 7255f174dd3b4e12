"""The one exception a user mistake raises: the CLI prints it without a traceback and exits 2."""


class DpolabError(Exception):
    """A user error: says what is wrong, where (file, row, field, config key) and what to do."""
