"""Partitioned prepare: the same bytes from 1 worker, 2 workers, a killed-and-rerun run and task
groups; compressed inputs; bad inputs named; finished tasks never rewritten; the tokenizer sample
independent of the partition; a many-task dataset serving the same blocks; concurrent prepares."""

import gzip
import json
import lzma
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import roberta_ds.data.prepare as P
from roberta_ds.data.dataset import PackedDataset
from roberta_ds.data.prepare import PrepareError, prepare
from tests.data.prepared import ROOT, dataset_files, kjv_jsonl, same_blocks, write_v1

ARGS = dict(vocab_size=400, seq_len=64, valid_fraction=0.05, progress=False, tokenizer_sample_bytes=400_000)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("kjv_tasks")
    return kjv_jsonl(d / "kjv.jsonl", copies=1)  # 1,189 chapters, 4.3 MB: 4 tasks of 1 MiB


@pytest.fixture(scope="module")
def one_worker(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("one") / "ds"
    return prepare([str(corpus)], out, workers=1, task_bytes=1 << 20, **ARGS)


@pytest.fixture(scope="module")
def one_task(corpus, one_worker, tmp_path_factory):
    """The corpus as one task, with one_worker's tokenizer."""
    out = tmp_path_factory.mktemp("one_task") / "ds"
    kw = {**ARGS, "tokenizer": str(one_worker / "tokenizer")}
    return prepare([str(corpus)], out, workers=1, task_bytes=1 << 30, **kw)


def test_two_workers_and_task_groups_write_the_same_bytes(corpus, one_worker, tmp_path):
    ref = dataset_files(one_worker)
    meta = json.loads((one_worker / "metadata.json").read_text())
    assert meta["format_version"] == 2 and meta["report"]["tasks"] == -(-corpus.stat().st_size // (1 << 20))
    two = prepare([str(corpus)], tmp_path / "two", workers=2, task_bytes=1 << 20, **ARGS)
    assert dataset_files(two) == ref
    groups = tmp_path / "groups"  # what a Slurm array of 3 tasks runs, then the finalize job
    for g in (2, 0, 1):
        prepare([str(corpus)], groups, workers=1, task_bytes=1 << 20, task_group=g, num_task_groups=3, **ARGS)
        assert (groups / "metadata.json").exists() == (g == 1)
    assert dataset_files(groups) == ref


def test_sigkill_mid_prepare_then_rerun_is_byte_equal_and_keeps_finished_tasks(corpus, one_worker, tmp_path):
    out = tmp_path / "ds"
    cmd = [sys.executable, "-m", "roberta_ds.prepare", str(corpus), "--out", str(out), "--workers", "2"]
    cmd += ["--task-bytes", str(1 << 20), "--vocab-size", "400", "--seq-len", "64", "--no-progress"]
    cmd += ["--valid-fraction", "0.05", "--tokenizer-sample-bytes", "400000"]
    proc = subprocess.Popen(cmd, cwd=ROOT, start_new_session=True, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "tasks" / "task_00000" / "manifest.json").exists():
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)  # the CLI and its workers, mid-write
    proc.wait()
    assert not (out / "metadata.json").exists(), "finished before the kill: make the corpus larger"
    done = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in (out / "tasks").glob("task_?????/*")}
    assert done
    prepare([str(corpus)], out, workers=1, task_bytes=1 << 20, **ARGS)
    assert dataset_files(out) == dataset_files(one_worker)
    assert {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in done} == done  # never rewritten
    assert not list((out / "tasks").glob("*.lock")) and not list((out / "tasks").glob("*.tmp-*"))
    # a finished dataset is reused as is
    before = (out / "metadata.json").stat().st_mtime_ns
    prepare([str(corpus)], out, workers=1, task_bytes=1 << 20, **ARGS)
    assert (out / "metadata.json").stat().st_mtime_ns == before


def test_tokenizer_sample_is_the_same_whatever_the_partition(corpus, tmp_path, monkeypatch):
    seen = []
    real = P.train_bpe
    monkeypatch.setattr(P, "train_bpe", lambda texts, v: (seen.append(list(texts)), real(seen[-1], v))[1])
    for i, task_bytes in enumerate((1 << 30, 300_000)):
        prepare([str(corpus)], tmp_path / f"ds{i}", workers=1, task_bytes=task_bytes, **ARGS)
    docs = [json.loads(line)["text"] for line in corpus.read_text().splitlines()]
    assert seen[0] == seen[1]
    assert 0.5 * 400_000 < sum(len(t.encode()) for t in seen[0]) <= 400_000  # the byte budget
    pos = [docs.index(t) for t in seen[0]]
    assert pos == sorted(pos) and pos[0] < len(docs) / 10 and pos[-1] > 0.9 * len(docs)  # all over
    assert (tmp_path / "ds0/tokenizer/tokenizer.json").read_bytes() == (
        tmp_path / "ds1/tokenizer/tokenizer.json"
    ).read_bytes()


@pytest.mark.parametrize("suffix, opener", [(".gz", gzip.open), (".zst", None), (".xz", lzma.open)])
def test_compressed_jsonl_gives_the_plain_file_tokens(corpus, one_worker, one_task, tmp_path, suffix, opener):
    if opener is None:
        zstd = pytest.importorskip("zstandard")
        opener = lambda p, mode: zstd.open(p, mode)  # noqa: E731
    src = tmp_path / f"kjv.jsonl{suffix}"
    with opener(src, "wb") as f:
        f.write(corpus.read_bytes())
    tok = str(one_worker / "tokenizer")
    kw = {**ARGS, "tokenizer": tok}
    plain = one_task
    packed = prepare([str(src)], tmp_path / "packed", workers=1, **kw)
    for split in ("train", "valid"):
        assert same_blocks(PackedDataset(plain, split), PackedDataset(packed, split))


def test_bad_json_line_is_named_and_finished_tasks_are_kept(corpus, one_worker, tmp_path):
    bad = tmp_path / "bad.jsonl"
    lines = corpus.read_text().splitlines()
    lines[1000] = '{"text": "cut short'
    bad.write_text("\n".join(lines) + "\n")
    out = tmp_path / "ds"
    with pytest.raises(PrepareError, match=rf"{bad}:1001: not a JSON object"):
        prepare(
            [str(bad)],
            out,
            workers=2,
            task_bytes=1 << 20,
            **{**ARGS, "tokenizer": str(one_worker / "tokenizer")},
        )
    assert (out / "tasks" / "task_00000" / "manifest.json").is_file()  # line 1001 is in task 3 of 4
    lines[1000] = '{"body": "no text field"}'
    bad2 = tmp_path / "bad2.jsonl"
    bad2.write_text("\n".join(lines) + "\n")
    with pytest.raises(PrepareError, match=rf"{bad2}:1001: no 'text' field \(fields: \['body'\]\)"):
        prepare([str(bad2)], tmp_path / "ds2", workers=1, task_bytes=1 << 20, **ARGS)


def test_corrupt_compressed_file_is_named_with_exit_2(corpus, tmp_path):
    src = tmp_path / "kjv.jsonl.gz"
    src.write_bytes(gzip.compress(corpus.read_bytes())[:200_000])  # truncated download
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "roberta_ds.prepare",
            str(src),
            "--out",
            str(tmp_path / "ds"),
            "--no-progress",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 2, res.stderr[-2000:]
    assert f"prepare: error: {src}:" in res.stderr and "could not read (gz)" in res.stderr
    assert "Traceback" not in res.stderr


def test_many_task_dataset_serves_the_same_blocks_and_a_format_1_folder_loads(
    corpus, one_worker, one_task, tmp_path
):
    tok = str(one_worker / "tokenizer")
    one = one_task
    many = prepare(
        [str(corpus)], tmp_path / "many", workers=1, task_bytes=40_000, **{**ARGS, "tokenizer": tok}
    )
    assert json.loads((many / "metadata.json").read_text())["report"]["tasks"] > 90
    for seq_len in (64, 24):  # sequence-length warmup blocks span task boundaries too
        assert same_blocks(PackedDataset(one, "train", seq_len), PackedDataset(many, "train", seq_len))
    old = write_v1(one, tmp_path / "v1", shard_blocks=50)
    assert same_blocks(PackedDataset(one), PackedDataset(old))


def test_second_prepare_of_the_same_folder_joins_or_refuses(corpus, one_worker, tmp_path):
    out = tmp_path / "ds"
    base = [sys.executable, "-m", "roberta_ds.prepare", str(corpus), "--out", str(out), "--no-progress"]
    base += ["--task-bytes", str(1 << 20), "--vocab-size", "400", "--seq-len", "64"]
    base += ["--valid-fraction", "0.05", "--tokenizer-sample-bytes", "400000", "--workers", "1"]
    first = subprocess.Popen(base, cwd=ROOT, stderr=subprocess.PIPE, text=True)
    while not (out / "settings.json").exists():
        time.sleep(0.02)
    other = subprocess.run(
        base[:-2] + ["--workers", "1", "--seq-len", "32"], cwd=ROOT, capture_output=True, text=True
    )
    second = subprocess.run(base, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert first.wait(timeout=300) == 0, first.stderr.read()[-3000:]
    assert other.returncode == 2 and other.stderr.count("prepare: error:") == 1
    assert "is being prepared with other settings" in other.stderr and "Traceback" not in other.stderr
    assert second.returncode == 0, second.stderr[-3000:]
    assert dataset_files(out) == dataset_files(one_worker)


def test_builtin_style_format_1_folder_is_reused(one_worker, tmp_path):
    from roberta_ds.data.corpus import builtin_dataset_dir, prepare_builtin

    folder = builtin_dataset_dir(tmp_path, "train", 400, 64)
    write_v1(one_worker, folder, shard_blocks=1000)
    before = (folder / "metadata.json").stat().st_mtime_ns
    assert prepare_builtin(tmp_path, "train", 400, 64, progress=False) == folder
    assert (folder / "metadata.json").stat().st_mtime_ns == before
    assert len(PackedDataset(folder)) == len(PackedDataset(one_worker))


def test_task_group_out_of_range_is_refused_before_any_work(tmp_path):
    with pytest.raises(PrepareError, match="--task-group 3 must be in"):
        prepare(["x"], Path(tmp_path / "ds"), task_group=3, num_task_groups=2, **ARGS)
    assert not (tmp_path / "ds").exists()


def test_long_documents_tokenised_in_pieces_give_the_same_dataset(
    corpus, one_worker, one_task, tmp_path, monkeypatch
):
    import roberta_ds.data.tasks as T

    text = "In the beginning  God created\nthe heaven and the earth. " * 400
    monkeypatch.setattr(T, "PIECE_CHARS", 1000)  # KJV chapters are 1-20 K characters: many pieces
    ps = T.pieces(text)
    assert len(ps) > 10 and "".join(ps) == text and all(p.startswith(" ") for p in ps[1:])
    out = prepare([str(corpus)], tmp_path / "ds", workers=1, task_bytes=1 << 30,
                  **{**ARGS, "tokenizer": str(one_worker / "tokenizer")})  # fmt: skip
    assert dataset_files(out) == dataset_files(one_task)  # the same ids, offsets and index


def test_train_py_runs_on_a_many_task_dataset(corpus, one_worker, tmp_path):
    from tests.training.conftest import launch, losses, write_config, write_ds

    kw = {**ARGS, "tokenizer": str(one_worker / "tokenizer"), "valid_fraction": 0.2}
    many = prepare([str(corpus)], tmp_path / "many", workers=2, task_bytes=100_000, **kw)
    assert json.loads((many / "metadata.json").read_text())["report"]["tasks"] >= 40
    cfg = write_config(tmp_path / "run.yaml", many, tmp_path / "run", model={"vocab_size": 400},
                       max_steps=6, save_every=0, eval_every=3)  # fmt: skip
    res = launch("python", 1, cfg, write_ds(tmp_path / "ds.json"), timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    assert sorted(losses(tmp_path / "run")) == list(range(1, 7))


def test_a_dead_nodes_task_lock_is_named_then_taken_over_and_its_litter_removed(
    corpus, one_worker, tmp_path, monkeypatch, caplog
):
    """A node that died holding a task leaves a lock no other host can check and a half-written temp
    folder. The prepare that waits for it names the holder, takes the lock over once its heartbeat has
    been silent for STALE_S (2 s here, 600 by default), and the dataset is the same bytes."""
    import logging

    from roberta_ds.data import locks

    monkeypatch.setattr(locks, "STALE_S", 2.0)
    monkeypatch.setattr(P, "WAIT_NOTE_S", 0)
    out = tmp_path / "ds"
    (out / "tasks").mkdir(parents=True)
    lock = out / "tasks" / "task_00001.tokenize.lock"
    lock.write_text("deadnode 77 4242")  # fresh: its holder looks alive for 2 s
    litter = out / "tasks" / "task_00001.tokenize.tmp-deadnode-77"
    litter.mkdir()
    (litter / "train.bin").write_bytes(b"half")
    kw = {**ARGS, "tokenizer": str(one_worker / "tokenizer")}
    with caplog.at_level(logging.WARNING, logger=P.log.name):
        kw.update(workers=1, task_bytes=1 << 20)
        run = threading.Thread(target=prepare, args=([str(corpus)], out), kwargs=kw, daemon=True)
        run.start()
        run.join(timeout=120)  # a takeover that never comes fails here instead of hanging the suite
        assert not run.is_alive(), "the prepare still waits for the dead node's lock"
    ref = prepare([str(corpus)], tmp_path / "ref", **kw)
    assert dataset_files(out) == dataset_files(ref)
    assert "waiting for tokenize task 1" in caplog.text and "host deadnode pid 77" in caplog.text
    assert "lock taken over from 'deadnode 77 4242'" in (out / "logs" / "task_00001.log").read_text()
    assert not litter.exists() and not list((out / "tasks").glob("*.lock*"))


def test_a_published_tokenizer_is_used_and_never_replaced(corpus, one_worker, tmp_path):
    """A holder of the tokenizer lock that published tokenizer/ and died before its completion mark
    (or a second holder, after a takeover, that comes later) leaves a complete folder: the next one
    uses it as it is, so nothing that workers may be reading is replaced."""
    import shutil

    kw = {**ARGS, "tokenizer": str(one_worker / "tokenizer"), "workers": 1, "task_bytes": 1 << 20}
    ref = prepare([str(corpus)], tmp_path / "ref", **kw)
    out = tmp_path / "ds"
    shutil.copytree(ref, out)
    for mark in ("metadata.json", "tokenizer_info.json"):  # as if killed after publishing tokenizer/
        (out / mark).unlink()

    def stamps():  # inode and mtime of each file: a rewrite changes them (an inode alone may be reused)
        return {f.name: (f.stat().st_ino, f.stat().st_mtime_ns) for f in (out / "tokenizer").iterdir()}

    before = stamps()
    prepare([str(corpus)], out, **kw)
    assert stamps() == before
    assert dataset_files(out) == dataset_files(ref)


def test_what_killed_processes_left_is_removed_when_the_dataset_is_finished(corpus, one_worker, tmp_path):
    """A prepare killed between two steps leaves what it had in hand: the lock of a task it had just
    completed (never looked at again: the task is done), a lock's part file (killed inside claim), a
    lock moved aside in a takeover, part files of settings.json and tokenizer_info.json, a tokenizer
    temp folder, the sample. The run that finishes the dataset removes them (CI once found a dataset
    with one such file beside it after the SIGKILL test); a live process's files are left to it, and
    another host's part file until it has been silent for STALE_S."""
    import shutil

    from roberta_ds.data import locks

    out = tmp_path / "ds"
    shutil.copytree(one_worker, out)
    (out / "metadata.json").unlink()  # killed just before finalize
    gone = subprocess.Popen(["true"])
    gone.wait()
    live = subprocess.Popen(["sleep", "120"])
    host, dead, alive = locks.HOST, gone.pid, live.pid
    litter = {
        "tasks/task_00000.tokenize.lock": f"{host} {dead}",
        f"tasks/task_00002.tokenize.lock.{host}-{dead}": f"{host} {dead}",
        f"tasks/task_00001.tokenize.lock.stale-{host}-{dead}": f"{host} {dead}",
        f"tasks/task_00003.tokenize.tmp-{host}-{dead}/train.bin": "half",
        f"tokenizer.tmp-{host}-{dead}/vocab.json": "{}",
        "tokenizer.lock": f"{host} {dead}",
        f"tokenizer_info.json.{host}-{dead}": "{}",
        f"settings.json.{host}-{dead}": "{}",
        "sample/task_00000.jsonl": '[1, "text"]\n',
        "tasks/task_00003.tokenize.lock": "deadnode 77",  # another host's, silent for > STALE_S
        "tasks/task_00000.tokenize.lock.deadnode-77": "deadnode 77",
    }
    kept = {
        "tasks/task_00001.tokenize.lock": f"{host} {alive}",  # a live process's: it releases its own
        f"tasks.json.{host}-{alive}": "{}",
        "tasks/task_00002.tokenize.lock.freshnode-5": "freshnode 5",  # another host's, just written
    }
    try:
        for rel, text in {**litter, **kept}.items():
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            (out / rel).write_text(text)
        old = time.time() - locks.STALE_S - 60
        for rel in ("tasks/task_00003.tokenize.lock", "tasks/task_00000.tokenize.lock.deadnode-77"):
            os.utime(out / rel, (old, old))
        prepare([str(corpus)], out, workers=1, task_bytes=1 << 20, **ARGS)
        assert all((out / rel).read_text() == text for rel, text in kept.items())
    finally:
        live.kill()
        live.wait()
    left = {rel: digest for rel, digest in dataset_files(out).items() if rel not in kept}
    assert left == dataset_files(one_worker)
    assert not (out / "sample").exists() and not (out / f"tokenizer.tmp-{host}-{dead}").exists()
