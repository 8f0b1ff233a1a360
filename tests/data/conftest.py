import json

import pytest

from roberta_ds.data.prepare import prepare

WORDS = [
    "the",
    "of",
    "and",
    "to",
    "in",
    "is",
    "was",
    "for",
    "on",
    "that",
    "with",
    "as",
    "by",
    "at",
    "from",
    "his",
    "her",
    "it",
    "an",
    "are",
    "were",
    "which",
    "be",
    "this",
    "king",
    "river",
    "stone",
    "light",
    "house",
    "water",
    "field",
    "bread",
    "door",
    "garden",
    "morning",
    "evening",
    "city",
]


def make_docs(n, rng, lo=5, hi=120):
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi))) + "." for _ in range(n)]


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory):
    import random

    rng = random.Random(0)
    d = tmp_path_factory.mktemp("corpus")
    docs = make_docs(300, rng)
    docs.append(" ".join(rng.choice(WORDS) for _ in range(3000)))  # one document far longer than a block
    with (d / "docs.jsonl").open("w") as f:
        for doc in docs:
            f.write(json.dumps({"text": doc}) + "\n")
    return d, docs


@pytest.fixture(scope="session")
def prepared(corpus_dir, tmp_path_factory):
    d, docs = corpus_dir
    out = tmp_path_factory.mktemp("prepared") / "ds"
    prepare(
        [str(d / "docs.jsonl")],
        out,
        tokenizer="train",
        vocab_size=400,
        seq_len=64,
        valid_fraction=0.1,
        num_proc=1,
        progress=False,
    )
    return out, docs


@pytest.fixture(scope="session")
def words_dataset(kjv_dataset, tmp_path_factory):
    """A second small dataset prepared with kjv_dataset's tokenizer (so the two can be mixed)."""
    import random

    d = tmp_path_factory.mktemp("words")
    with (d / "docs.jsonl").open("w") as f:
        for doc in make_docs(100, random.Random(1)):
            f.write(json.dumps({"text": doc}) + "\n")
    return prepare(
        [str(d / "docs.jsonl")],
        d / "ds",
        tokenizer=str(kjv_dataset / "tokenizer"),
        seq_len=64,
        valid_fraction=0.1,
        num_proc=1,
        progress=False,
    )
