"""Data for the experiments: task loading (data_tasks.py), vocabulary, pretrained vectors, batches.

    data = load_task("sst")                       # the embedded SST; other tasks need data_dir
    vocab = Vocab.build_for_task(data)            # = Vocab.build(data.train, data.min_df, extra_tokens=data.vocab_extra)
    vectors, n_found = load_embeddings("glove.6B.300d.txt", vocab)
    for batch in make_batches(data.train, vocab, 32, shuffle=True, generator=torch.Generator().manual_seed(0)):
        ...
"""
from __future__ import annotations

import gzip
import math
import os
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields
from pathlib import Path

import torch

from .data_tasks import EMBEDDED_DATA, NLI_LABELS, TASKS, TaskInfo, load_task, parse_ptb_tree, read_babi
from .data_types import CorruptDataError, DataFormatError, Example, MissingDataError, TaskData, reading

__all__ = ["PAD", "UNK", "Example", "TaskData", "TaskInfo", "TASKS", "NLI_LABELS", "EMBEDDED_DATA", "load_task",
           "Vocab", "load_embeddings", "Batch", "make_batches", "DataFormatError", "CorruptDataError",
           "MissingDataError", "parse_ptb_tree", "read_babi"]

PAD = 0
UNK = 1


class Vocab:
    """Token <-> index. Index 0 is padding, 1 the unknown token; the rest are the training tokens whose
    document frequency reaches ``min_df`` (a text and its query count as separate documents, as in the
    authors' CountVectorizer), most frequent first, ties in alphabetical order."""

    PAD_TOKEN = "<pad>"
    UNK_TOKEN = "<unk>"

    def __init__(self, itos: Sequence[str]):
        itos = list(itos)
        if itos[:2] != [self.PAD_TOKEN, self.UNK_TOKEN]:
            raise ValueError(f"itos must start with {self.PAD_TOKEN!r}, {self.UNK_TOKEN!r}; got {itos[:2]}")
        if len(set(itos)) != len(itos):
            raise ValueError("itos holds a token twice")
        self.itos = itos
        self.stoi = {token: index for index, token in enumerate(itos)}

    @classmethod
    def build(cls, examples: Iterable[Example], min_df: int = 1, *, extra_tokens: Iterable[str] = ()) -> "Vocab":
        if not isinstance(min_df, int) or min_df < 1:
            raise ValueError(f"min_df must be a positive integer, got {min_df!r}")
        document_frequency: Counter[str] = Counter()
        for example in examples:
            document_frequency.update(set(example.tokens))
            if example.query is not None:
                document_frequency.update(set(example.query))
        kept = [token for token, count in document_frequency.items() if count >= min_df]
        kept.sort(key=lambda token: (-document_frequency[token], token))
        specials = {cls.PAD_TOKEN, cls.UNK_TOKEN}
        itos = [cls.PAD_TOKEN, cls.UNK_TOKEN] + [token for token in kept if token not in specials]
        present = set(itos)
        for token in extra_tokens:
            if token not in present:
                itos.append(token)
                present.add(token)
        return cls(itos)

    @classmethod
    def build_for_task(cls, task: TaskData) -> "Vocab":
        """The vocabulary the recipe prescribes: train tokens with df >= task.min_df, plus task.vocab_extra."""
        return cls.build(task.train, task.min_df, extra_tokens=task.vocab_extra)

    def token_counts(self, examples: Iterable[Example]) -> torch.Tensor:
        """How often each vocabulary index occurs in ``examples`` (texts and queries; out-of-vocabulary tokens
        count for <unk>, padding never occurs): float64 [len(self)], the word frequencies of Miyato et al.'s
        embedding normalisation."""
        counts = torch.zeros(len(self), dtype=torch.float64)
        ids = []
        for example in examples:
            ids += self.encode(example.tokens)
            if example.query is not None:
                ids += self.encode(example.query)
        if ids:
            counts += torch.bincount(torch.tensor(ids, dtype=torch.long), minlength=len(self)).double()
        return counts

    def encode(self, tokens: Iterable[str]) -> list[int]:
        stoi = self.stoi
        return [stoi.get(token, UNK) for token in tokens]

    def decode(self, ids: Iterable[int]) -> list[str]:
        return [self.itos[int(i)] for i in ids]

    def __len__(self) -> int:
        return len(self.itos)

    def __contains__(self, token: str) -> bool:
        return token in self.stoi

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocab) and self.itos == other.itos

    def __repr__(self) -> str:
        return f"Vocab({len(self)} tokens)"

    def to_dict(self) -> dict:
        """JSON-safe form for checkpoints."""
        return {"itos": list(self.itos)}

    @classmethod
    def from_dict(cls, state: dict) -> "Vocab":
        if not isinstance(state, dict) or "itos" not in state:
            raise ValueError("a Vocab state must be a dict with key 'itos' (from Vocab.to_dict())")
        return cls(state["itos"])


# ----------------------------------------------------------------------------------------------- embeddings

def _open_vectors(path: Path):
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8", errors="replace")
    return open(path, encoding="utf-8", errors="replace")


def load_embeddings(path: str | os.PathLike, vocab: Vocab, *, seed: int = 0,
                    lowercase_fallback: bool = True, found_indices: set | None = None) -> tuple[torch.Tensor, int]:
    """Vectors for ``vocab`` from a GloVe or fastText TEXT file (``word v1 ... vE`` per line; fastText's first
    line ``N E`` is recognised and skipped; .gz accepted).

    Returns (float32 [len(vocab), E], n_found). A vocabulary word takes the vector of the same word, else
    (``lowercase_fallback``) of the first word of the file equal to it up to case. Words not found, and the unknown
    token, get N(0, s^2) vectors with s the standard deviation of the vectors found (0.1 if none), drawn
    from a generator seeded with ``seed``; the padding row is zero. n_found counts vocabulary words (not
    the padding or unknown token) that received a pretrained vector; ``found_indices``, if given, receives
    their vocabulary indices."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"embeddings file {path} does not exist (any GloVe or fastText .txt/.vec file)")
    wanted = {token: index for index, token in enumerate(vocab.itos) if index > UNK}
    # case-insensitive fallback: vocabulary indices by lowercased token ("Mary" may take "mary"'s vector,
    # "paris" may take "Paris"'s) for words the file does not hold exactly
    by_lower: dict[str, list[int]] = {}
    if lowercase_fallback:
        for token, index in wanted.items():
            by_lower.setdefault(token.lower(), []).append(index)
    found: dict[int, list[float]] = {}
    found_by_case: dict[int, list[float]] = {}
    dim = None
    with reading(path), _open_vectors(path) as handle:
        for number, line in enumerate(handle, start=1):
            parts = line.rstrip().split(" ")
            if number == 1 and len(parts) == 2 and all(p.isdigit() for p in parts):
                dim = int(parts[1])  # fastText header "N E"
                continue
            if not line.strip():
                continue
            if dim is None:
                dim = len(parts) - 1
                if dim < 1:
                    raise DataFormatError(path, number, "expected 'word v1 ... vE'")
            if len(parts) < dim + 1:
                raise DataFormatError(path, number, f"expected a word and {dim} numbers, got {len(parts)} fields")
            # a few GloVe releases hold words with spaces: the vector is always the last dim fields
            word = parts[0] if len(parts) == dim + 1 else " ".join(parts[:-dim])
            index = wanted.get(word)
            case_matches = [i for i in by_lower.get(word.lower(), ()) if i != index and i not in found_by_case]
            if index is None and not case_matches:
                continue
            try:
                vector = [float(value) for value in parts[-dim:]]
            except ValueError:
                raise DataFormatError(path, number, "a vector component is not a number") from None
            if index is not None:
                found[index] = vector
            for i in case_matches:  # the first (most frequent) case variant in the file wins
                found_by_case[i] = vector
    if dim is None:
        raise DataFormatError(path, None, "the file holds no vectors")
    for index, vector in found_by_case.items():
        found.setdefault(index, vector)
    if found_indices is not None:
        found_indices.update(found)
    weights = torch.empty(len(vocab), dim, dtype=torch.float32)
    if found:
        indices = torch.tensor(sorted(found))
        weights[indices] = torch.tensor([found[i] for i in sorted(found)], dtype=torch.float32)
        scale = float(weights[indices].std()) if len(found) * dim > 1 else 0.1
    else:
        scale = 0.1
    missing = torch.tensor([i for i in range(len(vocab)) if i not in found and i != PAD], dtype=torch.long)
    generator = torch.Generator().manual_seed(seed)
    if len(missing):
        weights[missing] = torch.randn(len(missing), dim, generator=generator) * (scale if math.isfinite(scale) else 0.1)
    weights[PAD] = 0.0
    return weights, len(found)


# ----------------------------------------------------------------------------------------------- batches

@dataclass
class Batch:
    """A padded mini-batch. ``index``: positions of its examples in the list given to make_batches;
    ``candidate_mask``: True at the labels an example may take (CNN QA), None when every label may."""
    tokens: torch.Tensor  # [B, T] long, PAD after the end
    mask: torch.Tensor  # [B, T] bool, True at real tokens
    query: torch.Tensor | None  # [B, Tq] long
    query_mask: torch.Tensor | None  # [B, Tq] bool
    labels: torch.Tensor  # [B] long
    candidate_mask: torch.Tensor | None  # [B, n_labels] bool
    lengths: torch.Tensor  # [B] long
    index: torch.Tensor  # [B] long
    query_lengths: torch.Tensor | None = None  # [B] long

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def to(self, device: torch.device | str) -> "Batch":
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        return Batch(**{name: None if value is None else value.to(device) for name, value in moved.items()})


def _pad(sequences: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    lengths = torch.tensor([len(s) for s in sequences], dtype=torch.long)
    width = max(1, int(lengths.max()) if len(sequences) else 1)  # at least one column, even if all are empty
    ids = torch.full((len(sequences), width), PAD, dtype=torch.long)
    for row, sequence in enumerate(sequences):
        if sequence:
            ids[row, :len(sequence)] = torch.tensor(sequence, dtype=torch.long)
    mask = torch.arange(width)[None, :] < lengths[:, None]
    return ids, mask, lengths


def _batch_order(lengths: list[int], batch_size: int, shuffle: bool, generator: torch.Generator | None,
                 sort_by_length: bool, bucket_batches: int) -> list[list[int]]:
    """Groups of example positions. Shuffled: a random permutation, cut into buckets of ``bucket_batches``
    batches, each bucket sorted by length (so a batch holds similar lengths, little padding), batch order
    shuffled again. Not shuffled: sorted by length if asked, else the given order."""
    n = len(lengths)
    if shuffle:
        order = torch.randperm(n, generator=generator).tolist()
        if sort_by_length:
            bucket = batch_size * bucket_batches
            order = [i for start in range(0, n, bucket)
                     for i in sorted(order[start:start + bucket], key=lambda i: lengths[i])]
        groups = [order[start:start + batch_size] for start in range(0, n, batch_size)]
        return [groups[i] for i in torch.randperm(len(groups), generator=generator).tolist()]
    order = sorted(range(n), key=lambda i: lengths[i]) if sort_by_length else list(range(n))
    return [order[start:start + batch_size] for start in range(0, n, batch_size)]


def make_batches(examples: Sequence[Example], vocab: Vocab, batch_size: int, *, shuffle: bool,
                 generator: torch.Generator | None = None, device: torch.device | str | None = None,
                 num_labels: int | None = None, sort_by_length: bool = True,
                 bucket_batches: int = 50) -> list[Batch]:
    """Encode and pad ``examples`` into batches (see _batch_order for the order; the same generator state
    gives the same batches). ``num_labels`` is needed when examples carry ``candidates`` (CNN QA)."""
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    has_query = any(example.query is not None for example in examples)
    has_candidates = any(example.candidates is not None for example in examples)
    if has_candidates:
        if num_labels is None:
            raise ValueError("examples carry candidates: pass num_labels (TaskData.num_labels) to make_batches")
        for position, example in enumerate(examples):
            if example.candidates is not None and any(not 0 <= c < num_labels for c in example.candidates):
                raise ValueError(f"example {position}: candidates outside 0..{num_labels - 1}")
    token_ids = [vocab.encode(example.tokens) for example in examples]
    query_ids = [vocab.encode(example.query or []) for example in examples] if has_query else None
    groups = _batch_order([len(ids) for ids in token_ids], batch_size, shuffle, generator, sort_by_length,
                          bucket_batches)
    batches = []
    for group in groups:
        tokens, mask, lengths = _pad([token_ids[i] for i in group])
        query = query_mask = query_lengths = None
        if query_ids is not None:
            query, query_mask, query_lengths = _pad([query_ids[i] for i in group])
        candidate_mask = None
        if has_candidates:
            candidate_mask = torch.zeros(len(group), num_labels, dtype=torch.bool)
            for row, i in enumerate(group):
                if examples[i].candidates is None:
                    candidate_mask[row] = True
                else:
                    candidate_mask[row, examples[i].candidates] = True
        batch = Batch(tokens=tokens, mask=mask, query=query, query_mask=query_mask,
                      labels=torch.tensor([examples[i].label for i in group], dtype=torch.long),
                      candidate_mask=candidate_mask, lengths=lengths,
                      index=torch.tensor(group, dtype=torch.long), query_lengths=query_lengths)
        batches.append(batch.to(device) if device is not None else batch)
    return batches
