"""Offline evaluation tasks cut from the built-in corpus (roberta_ds/data/corpus.py).

Held out: `prepare` sends a document to the valid split by a hash of its text (`--valid-fraction`,
2% for the built-in corpus; every `valid_every`-th document in datasets of format 1), and
`roberta_ds.data.tasks.held_out` rebuilds that choice from the dataset's settings, so sentences of
held-out documents were never trained on by a model trained on the built-in data. Two tasks come
from them:
- cloze: a held-out sentence with one content word (not a function word, one BPE token with its
  leading space) replaced by <mask>; scored top-1 / top-5 on that token.
- source: which of Old Testament / New Testament / Python documentation a sentence comes from
  (3 balanced classes); its train part comes from training documents, its test part from held-out ones.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterator

from roberta_ds.data import tasks
from roberta_ds.data.corpus import BUILTIN_VALID_FRACTION, kjv_documents, python_doc_documents

# metadata.json's settings of the built-in dataset as prepare_builtin writes it (the split's owner)
BUILTIN_SETTINGS = {"valid_fraction": BUILTIN_VALID_FRACTION}
SOURCE_LABELS = ("old testament", "new testament", "python docs")
# English function words: a cloze on them measures little (the current Quickstart's fill-mask answers
# ',' ' the' ' and' for everything); content words need the context.
STOPWORDS = frozenset(
    """a about above after again all also am an and any are as at be because been before being below
    between both but by can could did do does doing down during each else few for from further had has
    have having he her here hers him his how i if in into is it its itself just let may me might more
    most much must my no nor not now of off on once only or other our out over own same shall she
    should so some such than that the their them then there these they this those thou thee thy thine
    through to too under until up upon us very was we were what when where which while who whom why will
    with would ye you your unto hath saith""".split()  # noqa: SIM905 (a word list reads better as text)
)
_SENTENCE_END = re.compile(r"(?<=[.;:?!])\s+")
_WORD = re.compile(r"[A-Za-z]+")
_PROSE = re.compile(r"^[A-Za-z][A-Za-z ,;:'.?!()-]+[.;:?!]$")  # no markup, code or numbers


def documents(settings: dict | None = None) -> Iterator[tuple[int, bool, str]]:
    """(label index, held out?, text) for the built-in corpus in `prepare`'s document order, held
    out as the dataset prepared with `settings` (metadata.json's; default the built-in dataset's).
    The New Testament starts at the first document beginning with Matthew 1:1."""
    settings = settings or BUILTIN_SETTINGS
    label = 0
    for i, doc in enumerate(kjv_documents()):
        if doc.startswith("The book of the generation of Jesus Christ"):
            label = 1
        yield label, tasks.held_out(doc, i, settings), doc
    n = i + 1
    for j, doc in enumerate(python_doc_documents()):
        yield 2, tasks.held_out(doc, n + j, settings), doc


def sentences(text: str, min_words: int = 6, max_words: int = 40) -> list[str]:
    """Plain prose sentences of a document (reStructuredText markup and code are skipped)."""
    out = []
    for para in re.split(r"\n\s*\n", text):
        para = " ".join(para.split())
        for s in _SENTENCE_END.split(para):
            if _PROSE.match(s) and min_words <= len(s.split()) <= max_words:
                out.append(s)
    return out


def split_sentences(settings: dict | None = None) -> dict[bool, list[tuple[int, str]]]:
    """{held_out: [(label, sentence), ...]} over the whole corpus (`settings` as for documents)."""
    out: dict[bool, list[tuple[int, str]]] = {False: [], True: []}
    for label, held, doc in documents(settings):
        out[held].extend((label, s) for s in sentences(doc))
    return out


def cloze_items(tokenizer, corpus: dict, n: int = 300, seed: int = 0) -> list[dict]:
    """Held-out sentences with one content word masked, half Bible and half Python docs:
    {"text": "... <mask> ...", "answer": " word", "answer_id": int, "source": label}."""
    rng = random.Random(seed)
    per_source = {"bible": [], "python": []}
    for label, sent in corpus[True]:
        per_source["python" if label == 2 else "bible"].append(sent)
    items = []
    for name, sents in per_source.items():
        rng.shuffle(sents)
        picked = []
        for sent in sents:
            if len(picked) == n // 2:
                break
            item = _mask_one_word(tokenizer, sent, rng)
            if item:
                picked.append(item | {"source": name})
        items += picked
    return items


def _mask_one_word(tokenizer, sent: str, rng: random.Random) -> dict | None:
    cands = []
    for m in _WORD.finditer(sent):
        w = m.group()
        if m.start() == 0 or len(w) < 3 or w.lower() in STOPWORDS:
            continue  # the first word has no leading space, so its token differs
        ids = tokenizer.encode(" " + w, add_special_tokens=False)
        if len(ids) == 1:
            cands.append((m, ids[0]))
    if not cands:
        return None
    m, tid = rng.choice(cands)
    # <mask> strips the space before it (RoBERTa's lstrip), so it stands for " word".
    text = sent[: m.start() - 1] + " " + tokenizer.mask_token + sent[m.end() :]
    return {"text": text, "answer": " " + m.group(), "answer_id": tid}


def source_task(corpus: dict, n_train: int = 600, n_test: int = 300, seed: int = 0) -> dict[str, list]:
    """Balanced 3-class 'where is this sentence from' data: {"train"|"test": [(text, label), ...]}
    with train from training documents and test from held-out ones."""
    rng = random.Random(seed)
    out = {}
    for split, held_out, n in (("train", False, n_train), ("test", True, n_test)):
        rows = []
        for label in range(len(SOURCE_LABELS)):
            pool = [s for lab, s in corpus[held_out] if lab == label]
            rows += [(s, label) for s in rng.sample(pool, min(n // len(SOURCE_LABELS), len(pool)))]
        rng.shuffle(rows)
        out[split] = rows
    return out
