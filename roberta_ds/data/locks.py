"""Work locks that processes on any host share through a common filesystem (prepare's tasks and its
tokenizer step).

A lock is a file holding "host pid start" of its holder. It is written whole under a private name,
then linked into place: the link is the O_EXCL step (atomic on NFS too), and no reader ever sees a
lock without its holder. A lock is stale when its holder is dead:
  - on this host, when the process is gone, a zombie, or its pid now names a process started at
    another time (/proc);
  - on another host, when its heartbeat stopped. A holder touches its lock every HEARTBEAT_S; one not
    touched for STALE_S is stale. Ages are taken on the filesystem's clock (a lock's mtime against
    that of a file this process has just written), so the hosts' clocks are never compared.
A stale lock is taken over by renaming it away, then checking that what moved is what was judged
stale: a second waiter may have taken it over first, and its fresh lock is put back. Two holders
remain possible (a holder frozen past STALE_S that wakes up, or a third process that links in the
instant a wrongly moved lock is away); they are harmless, because each holder works in a folder of
its own and a completed task is never rewritten (tasks._finish).
"""

from __future__ import annotations

import os
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

HOST = socket.gethostname()
HEARTBEAT_S = float(os.environ.get("ROBERTA_DS_LOCK_HEARTBEAT_S", 30))
STALE_S = float(os.environ.get("ROBERTA_DS_LOCK_STALE_S", 600))  # 20 missed heartbeats


def _proc_stat(pid: int) -> list[str] | None:
    """/proc/<pid>/stat's fields from the state on (field 3), or None: no such process, or no /proc."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2 :].split()


def _started(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (with the pid, it names one process)."""
    fields = _proc_stat(pid)
    return fields[19] if fields else None


def me() -> str:
    """This process as a lock names it."""
    return f"{HOST} {os.getpid()} {_started(os.getpid()) or ''}".strip()


def is_stale(lock: Path, now: float | None = None) -> bool:
    """Whether the holder written in `lock` ("host pid [start]") is dead. A killed process can
    linger for a moment as a zombie, and its pid can be reused later: both count as dead, by the
    process state and start time in /proc (Linux); elsewhere by signal 0. A holder on another host is
    dead when its lock has not been touched for STALE_S by `now` (the filesystem's clock; default
    this host's)."""
    try:
        host, pid, *start = lock.read_text().split()
        pid, touched = int(pid), lock.stat().st_mtime
    except (FileNotFoundError, ValueError):
        return True  # gone, or not a holder's line (a lock cut short by a kill, before locks were whole)
    if host != HOST:
        return (time.time() if now is None else now) - touched > STALE_S
    return dead(pid, start[0] if start else None)


def dead(pid: int, start: str | None = None) -> bool:
    """Whether process `pid` of this host (started at `start`, if known) is dead: gone, a zombie, or
    the pid reused by a process started at another time."""
    if Path("/proc/self/stat").is_file():
        fields = _proc_stat(pid)
        return fields is None or fields[0] in "ZX" or (start is not None and fields[19] != start)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def left_by_dead(path: Path, now: float) -> bool:
    """Whether `path`, a lock (`*.lock`) or a work file named after its writer (`<name>.<host>-<pid>`,
    `.tmp-<host>-<pid>` or `.stale-<host>-<pid>`: claim's part files, the stages' temp files and
    folders), was left by a process that is dead (never, for a name of neither kind). A lock is judged by
    is_stale; a work file of this host by its pid; another host's once untouched for STALE_S by `now`
    (the filesystem's clock): a live writer renames its part files away within a moment."""
    if path.name.endswith(".lock"):
        return is_stale(path, now=now)
    mine = re.search(rf"\.(?:tmp-|stale-)?{re.escape(HOST)}-(\d+)$", path.name)
    if mine:
        return dead(int(mine[1]))
    if not re.search(r"\.\S+-\d+$", path.name):
        return False
    try:
        return now - path.stat().st_mtime > STALE_S
    except FileNotFoundError:
        return False  # removed meanwhile by its writer


def describe(lock: Path) -> str:
    """The holder and the heartbeat's age, for a message: 'host node3 pid 4242, touched 12 s ago' (the
    age on this host's clock, which may differ from the filesystem's by a little)."""
    try:
        host, pid, *_ = lock.read_text().split()
        age = max(0.0, time.time() - lock.stat().st_mtime)
    except (FileNotFoundError, ValueError):
        return "no holder now"
    return f"host {host} pid {pid}, touched {age:.0f} s ago"


def claim(lock: Path, on_takeover: Callable[[str], None] | None = None) -> bool:
    """Take `lock` for this process. A stale lock is taken over (`on_takeover` gets the dead
    holder's line); a live holder means the work is someone else's: False."""
    mine = me()
    part = lock.with_name(f"{lock.name}.{HOST}-{os.getpid()}")
    part.write_text(mine)
    try:
        for _ in range(3):
            try:
                os.link(part, lock)
                return True
            except FileExistsError:
                if part.stat().st_nlink == 2:  # linked after all (NFS: a retried link whose reply was lost)
                    return True
            try:
                seen, inode = lock.read_text(), lock.stat().st_ino
            except FileNotFoundError:
                continue  # released meanwhile
            if not is_stale(lock, now=part.stat().st_mtime):
                return False
            if _take_over(lock, inode) and on_takeover:
                on_takeover(seen.strip())
        return False
    finally:
        part.unlink(missing_ok=True)


def _take_over(lock: Path, inode: int) -> bool:
    """Remove the stale lock `inode` from `lock`'s place, and nothing else; whether we removed it."""
    moved = lock.with_name(f"{lock.name}.stale-{HOST}-{os.getpid()}")
    try:
        os.rename(lock, moved)
    except FileNotFoundError:
        return False  # another waiter moved it first
    try:
        if moved.stat().st_ino == inode:
            return True
        # we moved a fresh lock, taken since we judged the old one: put it back (if a third process
        # linked meanwhile, there are two holders: harmless, see above)
        with suppress(FileExistsError):
            os.link(moved, lock)
        return False
    finally:
        moved.unlink(missing_ok=True)


def release(lock: Path) -> None:
    """Remove `lock` if it is still ours (a holder judged dead may have been replaced)."""
    try:
        if lock.read_text().strip() == me():
            lock.unlink(missing_ok=True)
    except FileNotFoundError:
        pass


@contextmanager
def held(lock: Path, on_takeover: Callable[[str], None] | None = None) -> Iterator[bool]:
    """`with held(lock) as ours:` claims `lock` (see claim), keeps its heartbeat while the block runs,
    and releases it after."""
    if not claim(lock, on_takeover):
        yield False
        return
    stop = threading.Event()
    beat = threading.Thread(target=_heartbeat, args=(lock, stop), name=f"heartbeat {lock.name}", daemon=True)
    beat.start()
    try:
        yield True
    finally:
        stop.set()
        beat.join()
        release(lock)


def _heartbeat(lock: Path, stop: threading.Event) -> None:
    while not stop.wait(HEARTBEAT_S):
        # a miss (the lock moved away for a moment by a waiter's takeover check, a filesystem hiccup)
        # must not end the heartbeat: the next beat touches it again
        with suppress(OSError):
            os.utime(lock)
