"""Prepare: corpus -> tokenizer -> packed token shards on disk, partitioned, resumable, deterministic.

Stages (docs/data.md has the layout and the reasons):
1. plan: the inputs cut into tasks (roberta_ds/data/readers.py), written once to tasks.json;
2. tokenizer (--tokenizer train): every task keeps the documents whose hash falls below a threshold
   (sample/), then one process trains the BPE on the smallest hashes up to the byte budget;
3. tokenize: every task writes its own shards and manifest (roberta_ds/data/tasks.py);
4. finalize: metadata.json indexes every task's shards in task order; no token is copied.

Tasks run in a local process pool (`workers`), or a Slurm array task runs its group of them
(`task_group` of `num_task_groups`: tasks g, g + M, ...). Each stage does only what is missing, so a
rerun after a kill resumes, and the result is the same bytes however the work was split.

A block i of a split is <s> + stream[i*L : (i+1)*L] + </s> with L = seq_len - 2, crossing document
and shard boundaries as RoBERTa's FULL-SENTENCES does (roberta_ds/data/dataset.py).
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import logging
import multiprocessing as mp
import os
import shutil
import time
from pathlib import Path

import numpy as np

from roberta_ds.config import MIN_BPE_VOCAB
from roberta_ds.data import locks
from roberta_ds.data import tasks as T
from roberta_ds.data.progress import Progress
from roberta_ds.data.readers import PrepareError, Task, list_inputs, plan_tasks
from roberta_ds.data.tokenizer import check_roberta_layout, load_tokenizer, train_bpe

__all__ = ["PrepareError", "prepare", "token_dtype", "FORMAT_VERSION"]

log = logging.getLogger(__name__)
WAIT_NOTE_S = 60  # a wait on another process's lock longer than this is named in the log

FORMAT_VERSION = 2  # 1: one folder of {split}_{k}.bin shards written all at once (still read)
TASK_BYTES = 128 << 20  # a plain file larger than this is cut into ranges: tasks of ~30 s on a core
SAMPLE_BYTES = 1 << 30  # tokenizer training sample: BPE training holds ~2-3x this in memory
COMPRESSION_GUESS = 4  # uncompressed / compressed bytes, to size the sample of compressed inputs


def token_dtype(vocab_size: int):
    """uint16 halves the disk and page-cache footprint whenever every id fits."""
    return np.uint16 if vocab_size <= 2**16 else np.uint32


def prepare(
    inputs: list[str],
    out_dir: str | Path,
    tokenizer: str = "train",
    vocab_size: int = 8192,
    seq_len: int = 512,
    valid_fraction: float = 0.005,
    text_field: str = "text",
    workers: int | None = None,
    task_bytes: int = TASK_BYTES,
    tokenizer_sample_bytes: int = SAMPLE_BYTES,
    task_group: int | None = None,
    num_task_groups: int = 1,
    overwrite: bool = False,
    progress: bool = True,
    num_proc: int | None = None,
    valid_every: int | None = None,
) -> Path:
    """Tokenise and pack `inputs` into `out_dir`; returns it. A document goes to the held-out 'valid'
    split when its hash falls below `valid_fraction`. A finished folder with the same settings is
    reused as is. `num_proc` is the old name of `workers`; `valid_every` N means valid_fraction 1/N.
    With `task_group`, only tasks task_group, task_group + num_task_groups, ... run here, and the
    dataset is finalized when every task is complete."""
    t0 = time.time()
    out = Path(out_dir)
    if valid_every is not None:
        valid_fraction = 1 / valid_every if valid_every else 0.0
    workers = workers or num_proc or os.cpu_count() or 1
    _check_args(seq_len, tokenizer, vocab_size, valid_fraction, task_group, num_task_groups)
    settings = {
        "inputs": [_canonical(i) for i in inputs],
        "tokenizer": tokenizer,
        "vocab_size": vocab_size,
        "seq_len": seq_len,
        "valid_fraction": valid_fraction,
        "text_field": text_field,
        "task_bytes": task_bytes,
        **({"tokenizer_sample_bytes": tokenizer_sample_bytes} if tokenizer == "train" else {}),
    }
    if _finished(out, settings, overwrite):
        log.info("prepare: %s is already prepared with these settings; reusing it", out)
        return out
    clock = PhaseClock(t0)
    files = None if (out / "tasks.json").is_file() else _list(inputs)  # bad inputs: nothing written
    _claim_folder(out, settings)
    plan = _plan(out, files, task_bytes)
    tasks = [Task(**t) for t in plan["tasks"]]
    mine = [t for t in tasks if task_group is None or t.index % num_task_groups == task_group]
    bar = Progress(out, progress)
    clock.lap("plan")
    info = _tokenizer_stage(out, tokenizer, vocab_size, settings, tasks, mine, workers, bar, clock)
    params = {
        "text_field": text_field,
        "tok_dir": str(out / "tokenizer"),
        "dtype": info["dtype"],
        "eos": info["special_tokens"]["eos"],
        "valid_fraction": valid_fraction,
    }
    run_stage("tokenize", out, mine, params, workers, bar)
    clock.lap("tokenize")
    if not all(T.task_dir(out, t.index).is_dir() for t in tasks):
        log.info(
            "prepare: task group %s of %d done; the dataset is finalized once every task is",
            task_group,
            num_task_groups,
        )
        return out
    finalize(out, tasks, settings, info, plan["skipped_binary_files"], clock)
    return out


class PhaseClock:
    """Wall seconds of each stage of this prepare (metadata.json's timings): 'plan', 'tokenizer' and
    'finalize' run on one process whatever the number of workers (the serial part that bounds
    scaling), 'sample' and 'tokenize' on all of them."""

    SERIAL = ("plan", "tokenizer", "finalize")

    def __init__(self, t0: float):
        self.t0 = self.last = t0
        self.phases: dict[str, float] = {}

    def lap(self, phase: str) -> None:
        now = time.time()
        self.phases[phase] = round(self.phases.get(phase, 0.0) + now - self.last, 3)
        self.last = now

    def seconds(self) -> float:
        return time.time() - self.t0


def _check_args(seq_len, tokenizer, vocab_size, valid_fraction, task_group, num_task_groups) -> None:
    if seq_len < 8:
        raise PrepareError(f"seq_len={seq_len} is too short for a block (<s> ... </s>)")
    if not 0 <= valid_fraction < 1:
        raise PrepareError(f"--valid-fraction {valid_fraction} must be in [0, 1)")
    if task_group is not None and not 0 <= task_group < num_task_groups:
        raise PrepareError(f"--task-group {task_group} must be in [0, --num-task-groups {num_task_groups})")
    check_tokenizer_arg(tokenizer, vocab_size)


def check_tokenizer_arg(tokenizer: str, vocab_size: int) -> None:
    if tokenizer == "train" and vocab_size < MIN_BPE_VOCAB:
        raise PrepareError(
            f"--vocab-size {vocab_size} is too small for a byte-level BPE (256 bytes + 5 specials need "
            f"at least {MIN_BPE_VOCAB})"
        )
    looks_local = tokenizer.startswith((".", "/", "~")) or tokenizer.count("/") > 1
    if tokenizer not in ("train", "gpt2") and looks_local and not Path(tokenizer).expanduser().is_dir():
        raise PrepareError(f"tokenizer folder not found: {tokenizer}")


def _canonical(item) -> str:
    """An input path as an absolute path (the same file spelled relative or absolute is one input)."""
    p = Path(item)
    return str(p.resolve()) if p.exists() else str(item)


def _same(old: dict, settings: dict) -> bool:
    old = dict(old)
    old["inputs"] = [_canonical(i) for i in old.get("inputs", [])]  # same file, other spelling
    return old == settings


def _finished(out: Path, settings: dict, overwrite: bool) -> bool:
    """True when `out` holds this dataset already; clears it for --overwrite; refuses other data."""
    meta_path = out / "metadata.json"
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        if _same(meta.get("settings") or {}, settings) and not overwrite:
            return True
        if not overwrite:
            raise PrepareError(
                f"{out} holds a dataset prepared with other settings "
                f"({meta.get('settings')}); pass --overwrite or choose another --out"
            )
    if overwrite and out.exists():
        shutil.rmtree(out)
    return False


def _claim_folder(out: Path, settings: dict) -> None:
    """settings.json marks a folder as this prepare's (created once, O_EXCL through a link); a
    prepare with the same settings joins the work, one with other settings is refused."""
    target = out / "settings.json"
    # another process of this prepare may be between making its subfolders and linking settings.json
    ours = {"tasks", "logs"}
    if (
        not target.exists()
        and out.exists()
        and any(p.name not in ours and not p.name.startswith("settings.json.") for p in out.iterdir())
    ):
        raise PrepareError(f"{out} exists, is not empty and has no metadata.json; refusing to write into it")
    for sub in ("tasks", "logs"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    part = out / f"settings.json.{locks.HOST}-{os.getpid()}"
    part.write_text(json.dumps(settings, indent=1))
    try:
        os.link(part, target)
    except FileExistsError:
        old = json.loads(target.read_text())
        if not _same(old, settings):
            raise PrepareError(
                f"{out} is being prepared with other settings ({target}: {old}); wait for that prepare, "
                "or choose another --out"
            ) from None
    finally:
        part.unlink()


def _list(inputs: list[str]) -> tuple[list, list[str]]:
    skipped: list[str] = []
    files = [(k, _canonical(src), comp) for k, src, comp in list_inputs(list(inputs), skipped)]
    return files, skipped


def _stamp(src: str) -> list:
    p = Path(src)
    return [p.stat().st_size, p.stat().st_mtime_ns] if p.is_file() else []


def _plan(out: Path, files: tuple | None, task_bytes: int) -> dict:
    """The task list, computed once and stored: every later process (a rerun, an array task) runs
    the same tasks. An input file changed since then would shift the byte ranges: refused."""
    path = out / "tasks.json"
    if files is None and path.is_file():
        plan = json.loads(path.read_text())
        for src, stamp in plan["inputs"].items():
            if _stamp(src) != stamp:
                raise PrepareError(
                    f"{src} changed (size or mtime) since this prepare of {out} started; its finished tasks "
                    "would no longer match: pass --overwrite to start over"
                )
        return plan
    files, skipped = files
    tasks = plan_tasks(files, task_bytes)
    plan = {
        "tasks": [t.as_dict() for t in tasks],
        "skipped_binary_files": skipped,
        "inputs": {t.source: _stamp(t.source) for t in tasks},
    }
    part = out / f"tasks.json.{locks.HOST}-{os.getpid()}"
    part.write_text(json.dumps(plan, indent=1))
    part.replace(path)  # two planners write the same content
    return plan


# --------------------------------------------------------------------------------------------
# Running tasks


def run_stage(stage: str, out: Path, tasks: list[Task], params: dict, workers: int, bar: Progress) -> None:
    """Run the incomplete `tasks` of `stage`: in this process for one worker, else in a pool of
    spawned processes; a task another process holds is tried again every second (in the pool, so
    that one freed by a dead holder runs beside the rest) until it is complete."""
    done = (
        # the sample is removed once the tokenizer exists: then nothing is left to sample
        (lambda t: T.sample_file(out, t.index).exists() or (out / "tokenizer_info.json").is_file())
        if stage == "sample"
        else (lambda t: T.task_dir(out, t.index).is_dir())
    )
    todo = [t for t in tasks if not done(t)]
    bar.start(stage, tasks, todo)
    waiting = Waiting()

    def wait_for(t: Task) -> None:
        waiting.note(f"{stage} task {t.index}", T.lock_file(out, stage, t.index))

    if workers <= 1 or len(todo) <= 1:
        busy = [t for t in todo if _run_one(stage, out, t, params, bar) == "busy"]
        while busy:  # held by another process (another prepare, or an array task)
            for t in busy:
                wait_for(t)
            time.sleep(1)
            busy = [t for t in busy if not done(t) and _run_one(stage, out, t, params, bar) == "busy"]
    elif todo:
        ctx = mp.get_context("spawn")  # no fork of a process holding threads (tokenizers, torch)
        with cf.ProcessPoolExecutor(min(workers, len(todo)), mp_context=ctx) as ex:

            def submit(t: Task) -> cf.Future:
                f = ex.submit(T.run, stage, str(out), t.as_dict(), params)
                f.task = t
                return f

            pending, busy = {submit(t) for t in todo}, {}  # busy: task -> when it was found held
            try:
                while pending or busy:
                    finished, pending = cf.wait(pending, timeout=1, return_when=cf.FIRST_EXCEPTION)
                    for f in finished:
                        if f.result() == "busy":  # raises a worker's PrepareError here
                            busy[f.task] = time.time()
                            wait_for(f.task)
                    for t, since in list(busy.items()):
                        if done(t):
                            del busy[t]
                        elif time.time() - since >= 1:
                            del busy[t]
                            pending.add(submit(t))
                    if not pending and busy:
                        time.sleep(0.2)
                    bar.update()
            except BaseException:
                ex.shutdown(wait=True, cancel_futures=True)  # running tasks finish: nothing is lost
                raise
    bar.close()


class Waiting:
    """Names the holder of a lock this process has waited on for WAIT_NOTE_S, once per lock: a wait
    for another process (another prepare, an array task, a dead node's lock) is never silent."""

    def __init__(self) -> None:
        self.since: dict[Path, float] = {}

    def note(self, what: str, lock: Path) -> None:
        since = self.since.setdefault(lock, time.time())
        if since and time.time() - since >= WAIT_NOTE_S:
            self.since[lock] = 0.0
            log.warning(
                "prepare: waiting for %s, held by %s (%s). A holder on another host that is silent for "
                "%.0f s is taken over (ROBERTA_DS_LOCK_STALE_S)",
                what, locks.describe(lock), lock, locks.STALE_S,
            )  # fmt: skip


def _run_one(stage: str, out: Path, t: Task, params: dict, bar: Progress) -> str:
    result = T.run(stage, str(out), t.as_dict(), params)
    bar.update()
    return result


def _tokenizer_stage(out, tokenizer, vocab_size, settings, tasks, mine, workers, bar, clock) -> dict:
    """tokenizer/ and tokenizer_info.json (its completion mark), made by one process; returns the info."""
    info_path = out / "tokenizer_info.json"
    if info_path.is_file():
        clock.lap("tokenizer")
        return json.loads(info_path.read_text())
    if tokenizer == "train":
        budget = settings["tokenizer_sample_bytes"]
        guess = sum(
            t.size * (COMPRESSION_GUESS if t.compression or t.kind == "parquet" else 1) for t in tasks
        )
        fraction = 1.0 if any(t.kind == "hub" for t in tasks) else min(1.0, 1.25 * budget / max(guess, 1))
        params = {"text_field": settings["text_field"], "sample_threshold": T.threshold(fraction)}
        (out / "sample").mkdir(exist_ok=True)
        run_stage("sample", out, mine, params, workers, bar)
        # then the other groups' sample tasks not done yet (or waits for their holders): an array
        # group never waits for a group that Slurm has not started (arrays throttled with %N)
        run_stage("sample", out, tasks, params, workers, bar)
        clock.lap("sample")
    lock, waiting = out / "tokenizer.lock", Waiting()
    while not info_path.is_file():
        with locks.held(lock) as ours:
            if ours and not info_path.is_file():
                _make_tokenizer(out, tokenizer, vocab_size, settings, tasks)
        if not ours:
            waiting.note("the tokenizer", lock)
            time.sleep(1)
    clock.lap("tokenizer")
    return json.loads(info_path.read_text())


def _sample_texts(out: Path, tasks: list[Task], budget: int):
    """The sampled documents with the smallest hashes whose UTF-8 bytes fit the budget, in task
    order: a uniform sample that depends on the documents only, never on the partition."""
    sizes = []
    for t in tasks:
        with T.sample_file(out, t.index).open(encoding="utf-8") as f:
            sizes += [(h, len(text.encode("utf-8", "surrogatepass"))) for h, text in map(json.loads, f)]
    sizes.sort()
    cum = np.cumsum([s for _, s in sizes]) if sizes else np.zeros(0)
    keep = int(np.searchsorted(cum, budget, side="right"))
    cutoff = sizes[keep][0] if keep < len(sizes) else 2**64
    for t in tasks:
        with T.sample_file(out, t.index).open(encoding="utf-8") as f:
            for h, text in map(json.loads, f):
                if h < cutoff:
                    yield text


def _make_tokenizer(out: Path, tokenizer: str, vocab_size: int, settings: dict, tasks: list[Task]) -> None:
    """tokenizer/, then tokenizer_info.json (the completion mark). Safe with a second holder of the
    tokenizer lock (one taken over from a holder thought dead, locks.py): tokenizer/ is published by
    one rename, so it is complete, and is never replaced; whoever comes later uses it."""
    final = out / "tokenizer"
    if (out / "tokenizer_info.json").is_file():
        return
    if not final.is_dir():
        try:
            tok = _new_tokenizer(out, tokenizer, vocab_size, settings, tasks)
        except FileNotFoundError:  # the sample, removed by another holder that has finished
            if not final.is_dir():
                raise
        else:
            tmp = out / f"tokenizer.tmp-{locks.HOST}-{os.getpid()}"
            tok.save_pretrained(tmp)
            try:
                tmp.rename(final)
            except OSError:  # published meanwhile by another holder: the same tokenizer
                shutil.rmtree(tmp, ignore_errors=True)
                if not final.is_dir():
                    raise
    tok = load_tokenizer(str(final))  # the published one, whoever published it
    info = {
        "vocab_size": len(tok),
        "dtype": np.dtype(token_dtype(len(tok))).name,
        "special_tokens": {
            "bos": tok.bos_token_id,
            "pad": tok.pad_token_id,
            "eos": tok.eos_token_id,
            "unk": tok.unk_token_id,
            "mask": tok.mask_token_id,
        },
        "tokenizer": tokenizer_identity(out / "tokenizer", tokenizer),
    }
    part = out / f"tokenizer_info.json.{locks.HOST}-{os.getpid()}"
    part.write_text(json.dumps(info, indent=1))
    part.replace(out / "tokenizer_info.json")
    shutil.rmtree(out / "sample", ignore_errors=True)  # read by nobody once the tokenizer exists


def _new_tokenizer(out: Path, tokenizer: str, vocab_size: int, settings: dict, tasks: list[Task]):
    if tokenizer == "train":
        tok = train_bpe(_sample_texts(out, tasks, settings["tokenizer_sample_bytes"]), vocab_size)
    else:
        try:
            tok = load_tokenizer(tokenizer)
        except (OSError, ValueError, ImportError) as e:
            raise PrepareError(f"--tokenizer {tokenizer}: {type(e).__name__}: {str(e)[:300]}") from None
    try:
        check_roberta_layout(tok)
    except ValueError as e:
        raise PrepareError(f"--tokenizer {tokenizer}: {e}") from None
    return tok


def tokenizer_identity(tok_dir: Path, source: str) -> dict:
    import hashlib

    h = hashlib.sha256()
    for f in sorted(tok_dir.iterdir()):
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return {"source": source, "sha256": h.hexdigest()[:16]}


# --------------------------------------------------------------------------------------------
# Finalize


def finalize(
    out: Path, tasks: list[Task], settings: dict, info: dict, skipped: list[str], clock: PhaseClock
) -> dict:
    """metadata.json from the task manifests, in task order (no token is copied); written last."""
    report = {"documents": 0, "empty_documents": 0, "replaced_characters": 0, "tokens": 0}
    report["longest_document_tokens"] = 0
    splits = {s: {"num_tokens": 0, "num_documents": 0, "parts": []} for s in ("train", "valid")}
    for t in tasks:
        folder = T.task_dir(out, t.index)
        m = json.loads((folder / "manifest.json").read_text())
        for k in ("documents", "empty_documents", "replaced_characters", "tokens"):
            report[k] += m[k]
        report["longest_document_tokens"] = max(
            report["longest_document_tokens"], m["longest_document_tokens"]
        )
        for s, part in m["splits"].items():
            if part["num_tokens"]:
                rel = folder.relative_to(out)
                splits[s]["parts"].append(
                    {**part, "file": f"{rel}/{part['file']}", "doc_offsets": f"{rel}/{part['doc_offsets']}"}
                )
                splits[s]["num_tokens"] += part["num_tokens"]
                splits[s]["num_documents"] += part["num_documents"]
    if report["documents"] == 0:
        raise PrepareError(
            f"no documents found in {settings['inputs']} (empty files or empty documents only: "
            f"{report['empty_documents']} empty)"
        )
    for s in splits.values():
        s["num_blocks"] = -(-s["num_tokens"] // (settings["seq_len"] - 2))
    clock.lap("finalize")  # what is left (writing metadata.json) is a few ms
    seconds = clock.seconds()
    meta = {
        "format_version": FORMAT_VERSION,
        "num_tokens": sum(s["num_tokens"] for s in splits.values()),
        "num_documents": report["documents"],
        "num_blocks": splits["train"]["num_blocks"],
        "seq_len": settings["seq_len"],
        **info,
        "splits": splits,
        "settings": settings,
        "report": {**report, "skipped_binary_files": skipped, "tasks": len(tasks)},
        "timings": {
            "seconds": round(seconds, 2),
            "tokens_per_s": round(report["tokens"] / max(seconds, 1e-9)),
            "phases": clock.phases,  # this run's; a resumed prepare's count only what it redid
        },
    }
    part = out / f"metadata.json.{locks.HOST}-{os.getpid()}"
    part.write_text(json.dumps(meta, indent=1))
    try:  # written once: two processes that finish together keep the first one's (timings aside, equal)
        os.link(part, out / "metadata.json")
    except FileExistsError:
        meta = json.loads((out / "metadata.json").read_text())
    else:
        _sweep(out)
    finally:
        part.unlink()
    log.info(
        "prepare: %d documents, %d tokens, %d train blocks of %d, %d tasks -> %s (%.1fs: %s)",
        report["documents"],
        meta["num_tokens"],
        meta["num_blocks"],
        settings["seq_len"],
        len(tasks),
        out,
        seconds,
        ", ".join(f"{k} {v:.1f}s" for k, v in clock.phases.items()),
    )
    if report["replaced_characters"]:
        log.warning(
            "prepare: %d characters were not valid UTF-8 and were replaced by U+FFFD",
            report["replaced_characters"],
        )
    return meta


def _sweep(out: Path) -> None:
    """Remove what dead processes left beside the finished dataset `out`: a killed prepare's locks
    (one of a task it had just completed included), part files and temp folders, and the tokenizer
    sample. Every task is complete, so nothing works in a task's temp folder any more (another host's
    included); a live process's locks and part files are its own to remove."""
    now = (out / "metadata.json").stat().st_mtime  # the filesystem's clock, as lock ages are read
    shutil.rmtree(out / "sample", ignore_errors=True)  # read by nobody once the tokenizer exists
    for p in [*out.iterdir(), *(out / "tasks").iterdir()]:
        if ".tokenize.tmp-" in p.name or locks.left_by_dead(p, now):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
