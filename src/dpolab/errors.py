"""The one exception a user mistake raises: the CLI prints it without a traceback and exits 2."""


class DpolabError(Exception):
    """A user error: says what is wrong, where (file, row, field, config key) and what to do."""


def out_of_memory_error(doing: str, batch_size: int, at_one: str, option: str = "--batch_size") -> DpolabError:
    """CUDA ran out of memory `doing` something `batch_size` items at a time: half the batch (`option`), or what
    to change when one item alone does not fit (`at_one`)."""
    advice = f"run the same command with {option} {batch_size // 2}" if batch_size > 1 else at_one
    return DpolabError(f"CUDA ran out of memory {doing}: {advice}.")
