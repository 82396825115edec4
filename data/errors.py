"""The one exception type of the data package."""


class DataError(Exception):
    """A problem with the input data or output location, explained in one line that names the path.

    The CLI prints it as ``error: ...`` and exits 2; the loaders raise it at construction time
    (missing files, too few shards) or while iterating (too many corrupt samples). Messages name the
    library's parameters, never a command-line flag: the CLIs say their own flags.
    """


class OutputExists(DataError):
    """The output folder already holds shards, and the caller did not ask to overwrite them."""


class DataOutage(DataError):
    """A remote shard could not be read after every retry (data/remote.py): the store is down, not the data
    bad. The trainer checkpoints and exits with the requeue code, so the run continues once the store is back."""


class FlatFolder(DataError):
    """A class-folder tree was expected and the folder holds images directly: it needs a label file."""

    split = None  # the split whose folder it is, where the caller knows


class Interrupted(KeyboardInterrupt):
    """Ctrl-C stopped the writer: which splits are complete in the output, and which were not written
    (nothing of those is left: their staged shards are removed, any earlier shards of theirs kept)."""

    def __init__(self, out, complete: list[str], missing: list[str]):
        super().__init__(f"{', '.join(complete) or 'no split'} complete in {out}; not written: {', '.join(missing)}")
        self.out, self.complete, self.missing = out, complete, missing
