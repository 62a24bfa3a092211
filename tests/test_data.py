"""Data loaders of the experiments (experiments/paper/data*.py): the paper's recipes on the real data in
../shared/data (skipped with a printed reason when it is absent) and on tiny fixtures in the original formats
(tests/fixtures, written by tests/fixtures/make_fixtures.py); vocabulary, pretrained vectors, batches."""
from __future__ import annotations

import gzip
import json
import shutil
import sys
import tarfile
import warnings

import pytest
import torch

from conftest import REPO, SHARED_DATA

sys.path.insert(0, str(REPO / "experiments"))

from paper.data import (PAD, TASKS, UNK, DataFormatError, Example, MissingDataError, Vocab,  # noqa: E402
                        load_embeddings, load_task, make_batches, parse_ptb_tree, read_babi)
from paper.data_splits import shuffle_split, stratified_split  # noqa: E402

FIXTURES = REPO / "tests" / "fixtures"


def shared(*parts: str):
    """A path under ../shared/data, or a skip that says why."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        reason = f"real data {path} is absent (set FUSED_ATTN_AT_SHARED_DATA to the shared data folder)"
        print(f"SKIP: {reason}")
        pytest.skip(reason)
    return path


@pytest.fixture(scope="module")
def sst():
    return load_task("sst")


@pytest.fixture(scope="session")
def imdb_real():
    # the slowest load of the suite (50,000 reviews tokenised): once per session
    return load_task("imdb", shared("imdb"))


# ----------------------------------------------------------------------------------------------- errors

def test_unknown_task_lists_the_names():
    with pytest.raises(ValueError) as error:
        load_task("sst5")
    for name in TASKS:
        assert name in str(error.value)


@pytest.mark.parametrize("name", [n for n in TASKS if n != "sst"])
def test_missing_data_dir_names_url_and_where(name, tmp_path):
    with pytest.raises(MissingDataError) as error:
        load_task(name)
    message = str(error.value)
    assert TASKS[name].url in message and "--data-dir" in message
    # a folder without the files: the message names that folder too, and it is also a FileNotFoundError
    with pytest.raises(FileNotFoundError) as error:
        load_task(name, tmp_path)
    assert str(tmp_path) in str(error.value) and TASKS[name].url in str(error.value)


def test_nonexistent_data_dir(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_task("sst", tmp_path / "nowhere")


def test_bad_max_examples():
    with pytest.raises(ValueError, match="max_examples"):
        load_task("sst", max_examples=0)


# ----------------------------------------------------------------------------------------------- splits

def test_splits_match_scikit_learn():
    # index lists computed with scikit-learn 1.9.1's train_test_split on the same inputs
    assert shuffle_split(20, 16377, test_size=0.15) == (
        [2, 14, 18, 13, 9, 10, 5, 8, 1, 7, 0, 16, 6, 3, 15, 19, 12], [17, 4, 11])
    assert shuffle_split(23, 1378, train_size=0.8) == (
        [16, 14, 12, 22, 21, 18, 20, 19, 8, 10, 7, 17, 0, 5, 1, 3, 13, 9], [2, 6, 11, 4, 15])
    labels = [0] * 7 + [1] * 5 + [0, 1, 1, 0, 0, 1, 0, 1]
    assert stratified_split(labels, 13478, test_size=0.2) == (
        [14, 0, 18, 6, 17, 4, 3, 19, 5, 1, 15, 8, 9, 2, 13, 11], [12, 10, 7, 16])
    nli = ["neutral", "entailment", "contradiction", "entailment"] * 5
    assert stratified_split(nli, 13478, test_size=0.2) == (
        [14, 12, 4, 7, 16, 13, 11, 18, 3, 5, 15, 2, 8, 1, 10, 9], [6, 19, 0, 17])


def test_split_arguments_checked():
    with pytest.raises(ValueError):
        shuffle_split(10, 0, test_size=0.2, train_size=0.8)
    with pytest.raises(ValueError):
        stratified_split([0, 0, 0, 1], 0, test_size=0.5)  # one item of class 1 cannot be stratified


# ----------------------------------------------------------------------------------------------- SST

def test_sst_embedded_recipe(sst):
    assert sst.summary() == {"train": 6920, "dev": 872, "test": 1821}
    assert sst.kind == "bc" and sst.label_names == ["negative", "positive"] and sst.min_df == 1
    assert sst.label_counts("train") == [3310, 3610]
    assert sst.label_counts("dev") == [428, 444]
    assert sst.label_counts("test") == [912, 909]
    first = sst.train[0]  # "(3 (2 (2 The) (2 Rock)) ... (2 21st) ... (2 .)))"
    assert first.label == 1 and first.tokens[:3] == ["the", "rock", "is"] and "qqq" in first.tokens
    all_tokens = {t for e in sst.train for t in e.tokens}
    assert "-lrb-" not in all_tokens and "(" in all_tokens and all(t == t.lower() for t in all_tokens)
    assert len(Vocab.build_for_task(sst)) == 14645


def test_sst_shared_copy_equals_embedded(sst):
    assert load_task("sst", shared("sst")).splits() == sst.splits()


def test_sst_malformed_line_names_file_and_line(tmp_path):
    lines = gzip.open(REPO / "experiments" / "data" / "sst" / "dev.txt.gz", "rt", encoding="utf-8").read().splitlines()
    lines[4] = lines[4][:-1]  # drop the closing parenthesis of line 5
    for split in ("train", "test"):
        shutil.copy(REPO / "experiments" / "data" / "sst" / f"{split}.txt.gz", tmp_path)
    (tmp_path / "dev.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(DataFormatError, match=r"dev\.txt:5: ") as error:
        load_task("sst", tmp_path)
    assert error.value.line == 5


@pytest.mark.parametrize("tree, expected", [
    ("(3 (2 The) (4 (3 good) (2 film)))", (3, ["The", "good", "film"])),
    ("(1 (2 9\\/11) (0 -LRB-bad-RRB-))", (1, ["9\\/11", "-LRB-bad-RRB-"])),
])
def test_ptb_parser(tree, expected):
    assert parse_ptb_tree(tree) == expected


@pytest.mark.parametrize("tree", ["(3 (2 a) (2 b)", "(3 (2 a)) (2 b)", "(3 (x a))", "(5 (2 a))", "(3 (2 a) b (2 c))", "(3)"])
def test_ptb_parser_rejects(tree):
    with pytest.raises(ValueError):
        parse_ptb_tree(tree)


def test_max_examples_truncates_each_split(sst):
    small = load_task("sst", max_examples=5)
    assert small.summary() == {"train": 5, "dev": 5, "test": 5}
    assert small.train == sst.train[:5]


# ----------------------------------------------------------------------------------------------- bAbI

BABI_STORY = """1 Mary moved to the bathroom.
2 John went to the hallway.
3 Where is Mary? \tbathroom\t1
4 Daniel went back to the hallway.
5 Where is Daniel? \thallway\t4
1 Sandra journeyed to the garden.
2 Where is Sandra? \tgarden\t1
"""


def test_babi_parser_hand_checked(tmp_path):
    path = tmp_path / "qa1_single-supporting-fact_train.txt"
    path.write_text(BABI_STORY, encoding="utf-8")
    assert read_babi(path) == [
        ("Mary moved to the bathroom . John went to the hallway".split(), ["Where", "is", "Mary"], "bathroom"),
        ("Mary moved to the bathroom . John went to the hallway . Daniel went back to the hallway".split(),
         ["Where", "is", "Daniel"], "hallway"),
        ("Sandra journeyed to the garden".split(), ["Where", "is", "Sandra"], "garden"),
    ]


def test_babi_malformed_line(tmp_path):
    path = tmp_path / "qa1_single-supporting-fact_train.txt"
    path.write_text(BABI_STORY.replace("4 Daniel", "Daniel"), encoding="utf-8")
    with pytest.raises(DataFormatError, match=r"qa1_single-supporting-fact_train\.txt:4: "):
        read_babi(path)


@pytest.mark.parametrize("name, sizes, vocab_size", [
    ("babi1", {"train": 8500, "dev": 1500, "test": 1000}, 22),
    ("babi2", {"train": 8500, "dev": 1500, "test": 1000}, 36),
    ("babi3", {"train": 850, "dev": 150, "test": 1000}, 37),  # qa3 train: only the 1k file is in shared
])
def test_babi_real(name, sizes, vocab_size):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        task = load_task(name, shared("babi"))
    assert task.summary() == sizes
    assert task.kind == "qa" and task.min_df == 1
    assert task.label_names == ["bathroom", "bedroom", "garden", "hallway", "kitchen", "office"]
    assert len(Vocab.build_for_task(task)) == vocab_size
    assert all(e.query and e.query[0] in ("Where", "where") and e.tokens for e in task.train[:50])
    assert "en-10k" in task.source.split(";")[1]  # the test file is always the en-10k one
    fallback = name == "babi3"
    assert bool(task.notes) == fallback and any("1k" in str(w.message) for w in caught) == fallback


# ----------------------------------------------------------------------------------------------- IMDB

def test_imdb_real_recipe(imdb_real):
    assert imdb_real.summary() == {"train": 17220, "dev": 4305, "test": 4346}
    assert imdb_real.min_df == 10
    assert imdb_real.label_counts("train") == [8659, 8561]
    assert imdb_real.label_counts("test") == [2176, 2170]
    lengths = [len(e.tokens) for split in imdb_real.splits().values() for e in split]
    assert min(lengths) > 6 and max(lengths) < 400
    assert not any("br" in e.tokens for e in imdb_real.train[:2000])  # <br /> tags removed
    assert len(Vocab.build_for_task(imdb_real)) == 12263


def test_imdb_folder_and_jsonl_forms_agree(tmp_path):
    folder_form = load_task("imdb", FIXTURES)
    # the same reviews as aclImdb_{train,test}.jsonl.gz (positives by id, then negatives by id)
    for split in ("train", "test"):
        with gzip.open(tmp_path / f"aclImdb_{split}.jsonl.gz", "wt", encoding="utf-8") as handle:
            for polarity, label in (("pos", 1), ("neg", 0)):
                files = sorted((FIXTURES / "aclImdb" / split / polarity).iterdir(), key=lambda p: int(p.name.split("_")[0]))
                for path in files:
                    review_id, rating = path.stem.split("_")
                    handle.write(json.dumps({"id": int(review_id), "rating": int(rating), "label": label,
                                             "text": path.read_text(encoding="utf-8")}) + "\n")
    assert load_task("imdb", tmp_path).splits() == folder_form.splits()
    # 24 reviews per split, review 3 of pos and of neg too short: train 80/20 (19/5) and a 20% sample of
    # test (4), then the > 6 filter (both short train reviews fell in train, one short test review in test)
    assert folder_form.summary() == {"train": 17, "dev": 5, "test": 3}
    assert all("br" not in e.tokens and "qqq" in e.tokens for e in folder_form.train)


def test_imdb_malformed_jsonl(tmp_path):
    with gzip.open(tmp_path / "aclImdb_train.jsonl.gz", "wt", encoding="utf-8") as handle:
        handle.write(json.dumps({"id": 0, "label": 1, "text": "fine"}) + "\n{not json\n")
    shutil.copy(tmp_path / "aclImdb_train.jsonl.gz", tmp_path / "aclImdb_test.jsonl.gz")
    with pytest.raises(DataFormatError, match=r"aclImdb_train\.jsonl\.gz:2: "):
        load_task("imdb", tmp_path)


# ----------------------------------------------------------------------------------------------- 20 Newsgroups

# The posts ('postXX' code words) of each split, computed with scikit-learn 1.9.1: fetch_20newsgroups(
# subset='all', remove=('headers', 'footers', 'quotes')) over these folders, then the authors' selection and
# their two stratified train_test_split calls (seed 13478) and the 6 < length < 500 filter.
NEWS_GOLDEN = {
    "train": ["postaj", "postap", "postag", "postbb", "postam", "postao", "postab", "postad", "postav", "postah", "postaa"],
    "dev": ["postbd", "postba", "postaf"],
    "test": ["postaw", "postak", "postaq", "postay"],
}


def test_newsgroups_fixture_matches_scikit_learn_pipeline(tmp_path):
    task = load_task("20news", FIXTURES)
    assert {split: [e.tokens[0] for e in examples] for split, examples in task.splits().items()} == NEWS_GOLDEN
    assert task.label_names == ["baseball", "hockey"] and task.min_df == 2
    tokens = {t for e in task.train for t in e.tokens}
    assert not tokens & {"writes", "univ", "edu", "organization", "lines"}  # quotes, signatures, headers gone
    # the tarball gives the same task
    with tarfile.open(tmp_path / "20news-bydate.tar.gz", "w:gz") as tar:
        for subset in ("20news-bydate-train", "20news-bydate-test"):
            tar.add(FIXTURES / "20news-bydate" / subset, arcname=subset)
    assert load_task("20news", tmp_path).splits() == task.splits()


# ----------------------------------------------------------------------------------------------- AG News

def test_agnews_fixture():
    task = load_task("agnews", FIXTURES)
    # 20 World/Business rows of 40: 15% (ceil) to dev; the test csv has 6 of 12
    assert task.summary() == {"train": 17, "dev": 3, "test": 6}
    assert task.label_counts("test") == [3, 3] and task.min_df == 5
    tokens = task.tests["test"][0].tokens
    assert "'s" in tokens and "#" not in tokens and "quoted" in tokens


def test_agnews_malformed_row(tmp_path):
    shutil.copy(FIXTURES / "ag_news_csv" / "test.csv", tmp_path / "test.csv")
    rows = (FIXTURES / "ag_news_csv" / "train.csv").read_text(encoding="utf-8").splitlines()
    rows[6] = '"3","only a title"'
    (tmp_path / "train.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    with pytest.raises(DataFormatError, match=r"train\.csv:7: expected 3 fields"):
        load_task("agnews", tmp_path)
    rows[6] = '"x","title","description"'
    (tmp_path / "train.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    with pytest.raises(DataFormatError, match=r"train\.csv:7: class 'x'"):
        load_task("agnews", tmp_path)


# ----------------------------------------------------------------------------------------------- CNN

def test_cnn_fixture():
    task = load_task("cnn", FIXTURES)
    assert task.summary() == {"train": 4, "dev": 2, "test": 2}
    assert task.kind == "qa" and task.min_df == 8
    for example in task.train + task.dev + task.tests["test"]:
        passage_entities = {int(t[len("@entity"):]) for t in example.tokens if t.startswith("@entity")}
        assert example.candidates == sorted(passage_entities) and example.label in example.candidates
        assert "@placeholder" in example.query
        assert task.label_names[example.label].startswith("@entity")
    vocab = Vocab.build_for_task(task)  # min_df 8 drops the rare words, never the train entities
    assert task.vocab_extra and all(entity in vocab for entity in task.vocab_extra)
    batch = make_batches(task.train, vocab, 4, shuffle=False, num_labels=task.num_labels)[0]
    for row, index in enumerate(batch.index.tolist()):
        assert batch.candidate_mask[row].nonzero().flatten().tolist() == task.train[index].candidates
        assert batch.candidate_mask[row, batch.labels[row]]
    with pytest.raises(ValueError, match="num_labels"):
        make_batches(task.train, vocab, 4, shuffle=False)


def test_cnn_malformed_answer(tmp_path):
    shutil.copytree(FIXTURES / "cnn", tmp_path / "cnn")
    victim = sorted((tmp_path / "cnn" / "questions" / "validation").iterdir())[0]
    parts = victim.read_text(encoding="utf-8").split("\n\n")
    parts[3] = "Obama"
    victim.write_text("\n\n".join(parts), encoding="utf-8")
    with pytest.raises(DataFormatError, match=rf"{victim.name}:7: the answer 'Obama' is not an @entityN"):
        load_task("cnn", tmp_path)


def test_cnn_max_examples_reads_first_files():
    task = load_task("cnn", FIXTURES, max_examples=1)
    assert task.summary() == {"train": 1, "dev": 1, "test": 1}


# ----------------------------------------------------------------------------------------------- SNLI / MultiNLI

def test_snli_fixture():
    task = load_task("snli", FIXTURES)
    # every 7th record (k = 6, 13, 20) has gold label '-' and is dropped
    assert task.summary() == {"train": 18, "dev": 7, "test": 7}
    assert task.label_names == ["entailment", "neutral", "contradiction"] and task.min_df == 3
    first = task.train[0]
    assert first.label == 0 and first.query[:4] == ["the", first.query[1], "is", "n't"] and "qqq" in first.query
    assert first.tokens[0] == "a" and first.tokens[-1] == "."


def test_snli_malformed_jsonl(tmp_path):
    for split in ("train", "dev", "test"):
        shutil.copy(FIXTURES / "snli_1.0" / f"snli_1.0_{split}.jsonl", tmp_path)
    path = tmp_path / "snli_1.0_dev.jsonl"
    lines = path.read_text(encoding="utf-8").splitlines()
    lines[2] = lines[2].replace('"gold_label": "contradiction"', '"gold_label": "maybe"')
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(DataFormatError, match=r"snli_1\.0_dev\.jsonl:3: label 'maybe'"):
        load_task("snli", tmp_path)
    lines[2] = lines[2][:-5]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(DataFormatError, match=r"snli_1\.0_dev\.jsonl:3: expected a JSON object"):
        load_task("snli", tmp_path)


def test_snli_real_esnli_and_textfooler_forms():
    task = load_task("snli", shared("snli"), require_train=False)
    assert task.summary() == {"train": 0, "dev": 9842, "test": 9824}
    assert task.label_counts("dev") == [3329, 3235, 3278]
    sample = load_task("snli", shared("snli", "textfooler_sample"), require_train=False)
    assert sample.summary() == {"train": 0, "dev": 0, "test": 1000}
    assert sample.label_counts("test") == [367, 322, 311]
    with pytest.raises(MissingDataError, match="snli_1.0.zip"):
        load_task("snli", shared("snli"))  # the shared copy has no train split


def test_esnli_misaligned(tmp_path):
    for stem in ("s1", "s2", "labels"):
        (tmp_path / f"{stem}.test").write_text("a b c .\nd e f .\n" if stem != "labels" else "neutral\n", encoding="utf-8")
    with pytest.raises(DataFormatError, match=r"labels\.test:2: files are not line-aligned"):
        load_task("snli", tmp_path, require_train=False)


def test_multinli_fixture():
    task = load_task("multinli", FIXTURES)
    # 21 labelled train pairs: 20% (ceil, stratified) to dev; dev_matched / dev_mismatched are the test sets
    assert task.summary() == {"train": 16, "dev": 5, "matched": 6, "mismatched": 6}
    assert set(task.tests) == {"matched", "mismatched"}
    counts_all = [a + b for a, b in zip(task.label_counts("train"), task.label_counts("dev"))]
    assert counts_all == [7, 7, 7] and sorted(task.label_counts("dev")) == [1, 2, 2]


def test_multinli_real_samples():
    task = load_task("multinli", shared("multi_nli"), require_train=False)
    assert task.summary() == {"train": 0, "dev": 0, "matched": 1000, "mismatched": 1000}
    assert task.label_counts("matched") == [373, 311, 316]
    with pytest.raises(MissingDataError, match="multinli_1.0.zip"):
        load_task("multinli", shared("multi_nli"))


# ----------------------------------------------------------------------------------------------- Vocab

def test_vocab_document_frequency_and_round_trip():
    examples = [Example(tokens=["a", "b", "a"], label=0, query=["c"]),
                Example(tokens=["a", "c"], label=1, query=["b", "d"]),
                Example(tokens=["e"], label=0)]
    vocab = Vocab.build(examples, min_df=2)
    # df: a 2 (twice in one text counts once), b 2, c 2 (a text and a query are separate documents), d 1, e 1
    assert vocab.itos == ["<pad>", "<unk>", "a", "b", "c"]
    assert vocab.encode(["c", "zzz", "a"]) == [4, UNK, 2] and PAD == 0 and UNK == 1
    restored = Vocab.from_dict(json.loads(json.dumps(vocab.to_dict())))
    assert restored == vocab and len(restored) == 5
    assert len(Vocab.build(examples, 2, extra_tokens=["e", "a"])) == 6
    with pytest.raises(ValueError):
        Vocab.build(examples, min_df=0)
    with pytest.raises(ValueError):
        Vocab(["a", "<unk>"])


# ----------------------------------------------------------------------------------------------- embeddings

def test_glove_file(sst):
    path = shared("glove", "glove.6B.50d.top20k.txt")
    vocab = Vocab.build_for_task(sst)
    weights, n_found = load_embeddings(path, vocab)
    assert weights.shape == (len(vocab), 50) and weights.dtype == torch.float32
    assert n_found == 7562  # of 14643 SST words, in the 20,000 most frequent GloVe words
    assert torch.all(weights[PAD] == 0)
    first_line = path.open(encoding="utf-8").readline().split()  # "the 0.418 0.24968 ..."
    assert torch.allclose(weights[vocab.stoi[first_line[0]]], torch.tensor([float(v) for v in first_line[1:]]))


def test_fasttext_header_and_fallbacks(tmp_path):
    path = FIXTURES / "vectors" / "wiki.tiny.vec"
    rows = {line.split()[0]: [float(v) for v in line.split()[1:]]
            for line in path.read_text(encoding="utf-8").splitlines()[1:]}
    vocab = Vocab(["<pad>", "<unk>", "the", "team", "Team", "qqq", "missing", "GAME"])
    weights, n_found = load_embeddings(path, vocab, seed=3)
    assert weights.shape == (8, 4) and n_found == 5  # GAME takes game's vector (case fallback)
    for word in ("the", "team", "Team", "qqq"):
        assert torch.allclose(weights[vocab.stoi[word]], torch.tensor(rows[word]))
    assert torch.allclose(weights[vocab.stoi["GAME"]], torch.tensor(rows["game"]))
    assert not torch.equal(weights[vocab.stoi["missing"]], torch.zeros(4))
    other_seed, _ = load_embeddings(path, vocab, seed=4)
    assert not torch.equal(other_seed[vocab.stoi["missing"]], weights[vocab.stoi["missing"]])
    assert load_embeddings(path, vocab, lowercase_fallback=False)[1] == 4
    bad = tmp_path / "bad.vec"
    bad.write_text("2 3\nthe 0.1 0.2 0.3\nteam 0.1 0.2\n", encoding="utf-8")
    with pytest.raises(DataFormatError, match=r"bad\.vec:3: expected a word and 3 numbers"):
        load_embeddings(bad, vocab)


# ----------------------------------------------------------------------------------------------- batches

def test_batches_masks_and_coverage(sst):
    examples = sst.dev[:100]
    vocab = Vocab.build_for_task(sst)
    batches = make_batches(examples, vocab, 16, shuffle=True, generator=torch.Generator().manual_seed(0))
    seen = []
    for batch in batches:
        assert batch.tokens.dtype == torch.long and batch.mask.dtype == torch.bool
        assert torch.equal(batch.mask.sum(1), batch.lengths)
        assert torch.equal(batch.mask, torch.arange(batch.tokens.shape[1])[None, :] < batch.lengths[:, None])
        assert torch.all(batch.tokens[~batch.mask] == PAD) and torch.all(batch.tokens[batch.mask] != PAD)
        assert batch.query is None and batch.candidate_mask is None
        for row, index in enumerate(batch.index.tolist()):
            assert batch.tokens[row, :batch.lengths[row]].tolist() == vocab.encode(examples[index].tokens)
            assert batch.labels[row] == examples[index].label
        seen += batch.index.tolist()
    assert sorted(seen) == list(range(100)) and len(batches) == 7


def test_batches_deterministic_given_generator(sst):
    vocab = Vocab.build_for_task(sst)

    def order(seed):
        batches = make_batches(sst.dev, vocab, 32, shuffle=True, generator=torch.Generator().manual_seed(seed))
        return [b.index.tolist() for b in batches]
    assert order(1) == order(1) and order(1) != order(2)
    fixed = make_batches(sst.dev, vocab, 32, shuffle=False)
    lengths = [int(length) for b in fixed for length in b.lengths]
    assert lengths == sorted(lengths)  # evaluation batches are sorted by length: little padding


def test_batches_pair_task():
    examples = [Example(tokens=["a", "b", "c"], label=1, query=["q"]), Example(tokens=["a"], label=0, query=["q", "r"]),
                Example(tokens=[], label=0, query=["r"])]
    vocab = Vocab.build(examples)
    (batch,) = make_batches(examples, vocab, 8, shuffle=False, sort_by_length=False)
    assert batch.tokens.shape == (3, 3) and batch.query.shape == (3, 2)
    assert batch.lengths.tolist() == [3, 1, 0] and batch.query_lengths.tolist() == [1, 2, 1]
    assert torch.equal(batch.query_mask.sum(1), batch.query_lengths)
    assert not batch.mask[2].any()  # an empty text is an all-False row, not an error
    with pytest.raises(ValueError, match="batch_size"):
        make_batches(examples, vocab, 0, shuffle=False)


# ----------------------------------------------------------------------------------------------- corrupt files

def _cut_in_half(path):
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


def _sst_copy(tmp_path):
    folder = tmp_path / "sst"
    folder.mkdir()
    for split in ("train", "dev", "test"):
        shutil.copy(REPO / "experiments" / "data" / "sst" / f"{split}.txt.gz", folder)
    return folder


@pytest.mark.parametrize("damage", ["truncated", "not_gzip", "flipped"])
def test_corrupt_gz_data_file_names_the_file(damage, tmp_path):
    """A truncated or damaged .gz is a DataFormatError (what the CLIs report as one line) naming the file,
    not gzip's EOFError / BadGzipFile / zlib.error."""
    folder = _sst_copy(tmp_path)
    path = folder / "dev.txt.gz"
    if damage == "truncated":
        _cut_in_half(path)
    elif damage == "not_gzip":
        path.write_bytes(b"<html>a download error page</html>\n")
    else:
        data = bytearray(path.read_bytes())
        data[-8] ^= 0xFF  # the CRC-32 of the gzip trailer: every byte decompresses, the check fails at the end
        path.write_bytes(bytes(data))
    with pytest.raises(DataFormatError) as error:
        load_task("sst", folder)
    message = str(error.value)
    assert str(path) in message and "truncated or corrupt" in message and "download it again" in message
    assert "gzip" in message


def test_truncated_gz_embeddings(sst, tmp_path):
    path = tmp_path / "glove.txt.gz"
    shutil.copy(REPO / "experiments" / "data" / "glove" / "glove.6B.50d.sst.txt.gz", path)
    _cut_in_half(path)
    with pytest.raises(DataFormatError, match="truncated or corrupt") as error:
        load_embeddings(path, Vocab.build_for_task(sst))
    assert str(path) in str(error.value)


def test_truncated_tar_gz_archive(tmp_path):
    archive = tmp_path / "20news-bydate.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for subset in ("20news-bydate-train", "20news-bydate-test"):
            tar.add(FIXTURES / "20news-bydate" / subset, arcname=subset)
    _cut_in_half(archive)
    with pytest.raises(DataFormatError, match="truncated or corrupt") as error:
        load_task("20news", tmp_path)
    assert str(archive) in str(error.value)
