"""User-facing errors.

Everything a user can fix (a bad recipe, a missing file, a backend that is not installed) raises a
subclass of :class:`PomqError`. The CLI catches that one type and prints its message as a single line
with exit code 2; any other exception is our own bug and keeps its traceback.
"""


class PomqError(Exception):
    """An error the user can fix; its message is one line that names the file or field at fault."""

    exit_code = 2  # usage or input error

    def __str__(self) -> str:
        """One line, whatever it quotes: a key or value read from a file may hold newlines or control characters
        (found by tests/test_fuzz.py), shown escaped."""
        return "".join(c if c.isprintable() else repr(c)[1:-1] for c in super().__str__())


def first_line(e: BaseException) -> str:
    """What a one-line error quotes of a library's exception: its message's first line, or its type's name when
    it has none."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


class RecipeError(PomqError):
    """A recipe file is missing, unreadable or does not fit the schema."""


class DataError(PomqError):
    """A data set path is missing, empty or in a format we cannot read."""


class CheckpointError(PomqError):
    """A checkpoint file is missing, unreadable, or its tensors do not fit the model."""


class PlanError(PomqError):
    """A bit-width plan is malformed or does not fit the model it is applied to."""


class VerifyError(PomqError):
    """A built artifact does not compute what the PyTorch reference computes (the build's self-check);
    ``check``: the failed check's record (``Verification.to_json``)."""

    exit_code = 1

    def __init__(self, message: str, check: dict | None = None):
        super().__init__(message)
        self.check = check
