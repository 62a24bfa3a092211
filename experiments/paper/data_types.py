"""The records every task loader produces, and the errors it raises."""
from __future__ import annotations

import contextlib
import gzip
import os
import tarfile
import zipfile
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field


@dataclass
class Example:
    """One instance. ``tokens``: the text (binary classification), the premise (NLI) or the passage (QA);
    ``query``: the hypothesis / question of a pair task; ``candidates``: for CNN QA, the label indices
    (entities present in the passage) the answer may be chosen from."""
    tokens: list[str]
    label: int
    query: list[str] | None = None
    candidates: list[int] | None = None


@dataclass
class TaskData:
    """A task after the paper's recipe: splits, label names and the vocabulary threshold to use.

    ``tests`` maps the name of each test set to its examples (``{"test": ...}``; MultiNLI has
    ``{"matched": ..., "mismatched": ...}``). ``source`` says which files were read. ``vocab_extra`` lists
    tokens the vocabulary must hold whatever their frequency (CNN's entity markers, as in the authors'
    code); ``Vocab.build_for_task`` adds them. ``notes`` records anything a user should know about this
    load (a fallback file used, a split that the data lacked)."""
    name: str
    kind: str
    label_names: list[str]
    train: list[Example]
    dev: list[Example]
    tests: dict[str, list[Example]]
    source: str
    min_df: int
    vocab_extra: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    def splits(self) -> dict[str, list[Example]]:
        """All splits by name: train, dev, then the test sets."""
        return {"train": self.train, "dev": self.dev, **self.tests}

    def label_counts(self, split: str = "train") -> list[int]:
        """How many examples of ``split`` carry each label (index = label)."""
        counts = Counter(example.label for example in self.splits()[split])
        return [counts.get(label, 0) for label in range(self.num_labels)]

    def summary(self) -> dict[str, int]:
        return {split: len(examples) for split, examples in self.splits().items()}


class DataFormatError(ValueError):
    """A line of a data file does not have the format of the original distribution."""

    def __init__(self, path: str | os.PathLike, line: int | None, problem: str):
        self.path = str(path)
        self.line = line
        where = f"{self.path}:{line}" if line is not None else self.path
        super().__init__(f"{where}: {problem}")


class MissingDataError(FileNotFoundError, ValueError):
    """The files of a task are not where the loader looked. The message names the download address and
    the layout expected. (Both a FileNotFoundError and a ValueError, so either kind of handler sees it.)"""


class CorruptDataError(DataFormatError):
    """A compressed data file (.gz, .tar.gz / .tgz, .zip) cannot be read to its end: a download that
    stopped half way, or damaged bytes. A DataFormatError, so whatever reports those (train.py, evaluate.py,
    a sweep) reports this one the same way: one line naming the file."""

    def __init__(self, path: str | os.PathLike, error: BaseException):
        self.path = str(path)
        self.line = None
        self.reason = f"{_kind(error, self.path)}: {error}"
        ValueError.__init__(self, f"data file {self.path} is truncated or corrupt ({self.reason}); download it again")


def _kind(error: BaseException, path: str) -> str:
    if isinstance(error, zipfile.BadZipFile) or path.endswith(".zip"):
        return "zip"
    if isinstance(error, tarfile.TarError) and not isinstance(error, tarfile.CompressionError):
        return "tar"
    return "gzip"


# What the standard library raises for a compressed file it cannot read to its end. (gzip.BadGzipFile is an
# OSError: only that kind is caught, not a permission or disk error.)
_CORRUPT = (EOFError, zlib.error, gzip.BadGzipFile, tarfile.TarError, zipfile.BadZipFile)


@contextlib.contextmanager
def reading(path: str | os.PathLike) -> Iterator[None]:
    """Around the code that opens and reads ``path``: a truncated or corrupt compressed file becomes a
    CorruptDataError naming it, and bytes that are not UTF-8 a DataFormatError (in a compressed file, a
    CorruptDataError: the decompressed bytes are garbage), instead of the library's exception."""
    try:
        yield
    except CorruptDataError:
        raise
    except _CORRUPT as error:
        raise CorruptDataError(path, error) from error
    except UnicodeDecodeError as error:
        if str(path).endswith((".gz", ".tgz", ".zip")):
            raise CorruptDataError(path, error) from error
        raise DataFormatError(path, None, f"not UTF-8 text ({error})") from error
