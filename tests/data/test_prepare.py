import json

import numpy as np
import pytest
from transformers import AutoTokenizer

from roberta_ds.data.dataset import DatasetError, PackedDataset
from roberta_ds.data.prepare import PrepareError, prepare, token_dtype
from roberta_ds.data.tasks import SPLIT_KEY, threshold, unit_hash


def held_out(doc: str, fraction: float = 0.1) -> bool:
    return unit_hash(doc, SPLIT_KEY) < threshold(fraction)


def test_metadata_and_exact_token_counts(prepared):
    out, docs = prepared
    meta = json.loads((out / "metadata.json").read_text())
    tok = AutoTokenizer.from_pretrained(out / "tokenizer")
    # a real trained vocab (not a 5-token stub); this small corpus runs out of merges below 400
    assert len(tok) == meta["vocab_size"] and 300 < len(tok) <= 400
    lengths = [len(tok(d, add_special_tokens=False)["input_ids"]) + 1 for d in docs]  # + </s>
    assert meta["num_tokens"] == sum(lengths)
    assert meta["num_documents"] == len(docs)
    valid = [n for d, n in zip(docs, lengths) if held_out(d)]
    assert 0.05 * len(docs) < len(valid) < 0.15 * len(docs)  # --valid-fraction 0.1
    assert meta["splits"]["valid"]["num_tokens"] == sum(valid)
    assert meta["splits"]["valid"]["num_documents"] == len(valid)
    train_tokens = meta["splits"]["train"]["num_tokens"]
    assert meta["num_blocks"] == -(-train_tokens // 62) and meta["dtype"] == "uint16"
    assert meta["seq_len"] == 64 and meta["tokenizer"]["sha256"]


def test_full_sentences_block_layout(prepared):
    out, docs = prepared
    tok = AutoTokenizer.from_pretrained(out / "tokenizer")
    ds = PackedDataset(out, "train")
    train_docs = [d for d in docs if not held_out(d)]
    stream = np.concatenate([tok(d, add_special_tokens=False)["input_ids"] + [2] for d in train_docs])
    bodies = []
    for i in range(len(ds)):
        b = ds[i]
        ids, seg = b["input_ids"].numpy(), b["segment_ids"].numpy()
        assert ids.shape == (64,) and ids[0] == 0
        real = ids[ids != 1]
        assert real[-1] == 2  # every block is <s> ... </s>
        bodies.append(real[1:-1])
        # a new document starts right after every </s> separator inside the block
        body_seg = seg[1 : len(real) - 1]
        body = real[1:-1]
        for t in range(1, len(body)):
            assert body_seg[t] == body_seg[t - 1] + (body[t - 1] == 2)
        if i < len(ds) - 1:
            assert (ids != 1).all()  # only the last block of a split is padded
    assert np.array_equal(np.concatenate(bodies), stream)  # crossing document boundaries, nothing lost


def test_prepare_reuses_and_refuses_other_settings(prepared, corpus_dir):
    out, _ = prepared
    d, _ = corpus_dir
    before = (out / "metadata.json").stat().st_mtime_ns
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
    assert (out / "metadata.json").stat().st_mtime_ns == before
    with pytest.raises(PrepareError, match="prepared with other settings"):
        prepare(
            [str(d / "docs.jsonl")],
            out,
            tokenizer="train",
            vocab_size=400,
            seq_len=32,
            num_proc=1,
            progress=False,
        )


def test_interrupted_prepare_never_looks_finished(corpus_dir, tmp_path, monkeypatch):
    d, _ = corpus_dir
    out = tmp_path / "ds"
    import roberta_ds.data.prepare as P

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(P, "finalize", boom)
    with pytest.raises(KeyboardInterrupt):
        prepare([str(d / "docs.jsonl")], out, vocab_size=400, seq_len=64, num_proc=1, progress=False)
    assert not (out / "metadata.json").exists()  # finished tasks stay, the dataset is not one yet
    with pytest.raises(DatasetError, match="unfinished prepare"):
        PackedDataset(out)
    monkeypatch.undo()
    prepare([str(d / "docs.jsonl")], out, vocab_size=400, seq_len=64, num_proc=1, progress=False)  # resumes
    assert len(PackedDataset(out)) > 0 and not list(tmp_path.glob("ds.tmp*"))


def test_text_files_in_a_folder_with_multiprocess_tokenising(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text(
        "First document about the river.\n\nSecond document about a stone house.\n\n" * 50
    )
    (src / "b.txt").write_bytes(b"Caf\xe9 latin-1 bytes here and the end of it.\n\n" * 40)  # not UTF-8
    (src / "c.txt").write_bytes(b"\x00\x01binary" * 10)
    out = prepare([str(src)], tmp_path / "ds", vocab_size=300, seq_len=32, num_proc=2, progress=False)
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["report"]["replaced_characters"] == 40  # one per bad byte, counted
    assert meta["report"]["skipped_binary_files"] == [str(src / "c.txt")]
    assert meta["num_documents"] == 140


@pytest.mark.parametrize(
    "make, msg",
    [
        (lambda p: None, "input not found"),
        (lambda p: p.write_text(""), "no documents found"),
        (lambda p: p.write_text("\n\n   \n\n"), "no documents found"),
        (lambda p: p.write_bytes(b"\x7fELF\x00\x00\x01"), "binary file"),
    ],
)
def test_bad_inputs_give_clear_errors(tmp_path, make, msg):
    path = tmp_path / "in.txt"
    make(path)
    with pytest.raises(PrepareError, match=msg):
        prepare([str(path)], tmp_path / "out", vocab_size=300, seq_len=32, num_proc=1, progress=False)
    assert not (tmp_path / "out" / "metadata.json").exists()


def test_token_dtype_widens_for_large_vocabs():
    assert token_dtype(50265) == np.uint16 and token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32 and token_dtype(250_002) == np.uint32


def test_corrupt_shard_is_reported(prepared, tmp_path):
    import shutil

    out, _ = prepared
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    (copy / "tasks" / "task_00000" / "train.bin").write_bytes(b"\0\0")
    ds = PackedDataset(copy)  # shards are opened on first use: start-up reads the index only
    with pytest.raises(DatasetError, match="missing or truncated shard"):
        ds[0]


def test_prepare_cli_reports_bad_input_and_writes_nothing(tmp_path):
    import subprocess
    import sys

    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "roberta_ds.prepare",
            str(tmp_path / "missing.txt"),
            "--out",
            str(tmp_path / "ds"),
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 2
    assert f"prepare: error: input not found: {tmp_path / 'missing.txt'}" in res.stderr
    assert not (tmp_path / "ds").exists()


def test_held_out_rebuilds_the_valid_split_of_both_formats(prepared):
    from roberta_ds.data.tasks import held_out as rule

    out, docs = prepared
    settings = json.loads((out / "metadata.json").read_text())["settings"]
    valid = [d for i, d in enumerate(docs) if rule(d, i, settings)]
    assert valid == [d for d in docs if held_out(d)]
    assert [i for i in range(12) if rule("x", i, {"valid_every": 5})] == [4, 9]
