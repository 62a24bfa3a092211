"""The records every task loader produces, and the errors it raises."""
from __future__ import annotations

import os
from collections import Counter
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
