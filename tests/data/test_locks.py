"""Prepare's work locks (roberta_ds/data/locks.py): who is dead, takeover, heartbeat, release."""

import os
import subprocess
import sys
import time

from roberta_ds.data import locks as L


def test_a_lock_of_a_dead_zombie_or_reused_pid_is_stale_and_a_live_ones_is_not(tmp_path):
    """The holder of a task lock is dead when its process is gone, is a zombie (a SIGKILLed worker
    not yet reaped: a rerun started at once used to wait for it, then ran its task alone at the end),
    or its pid now names a process started at another time."""

    lock = tmp_path / "task_00000.tokenize.lock"
    assert L.claim(lock) and not L.is_stale(lock)  # ours, alive
    host, pid, start = lock.read_text().split()
    assert (host, int(pid)) == (L.HOST, os.getpid())
    lock.write_text(f"{L.HOST} {os.getpid()} {int(start) + 1}")
    assert L.is_stale(lock)  # the pid is ours, but the process that wrote the lock started earlier
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.time() + 30
    while (L._proc_stat(child.pid) or ["?"])[0] != "Z" and time.time() < deadline:
        time.sleep(0.05)  # exited, not reaped: a zombie
    lock.write_text(f"{L.HOST} {child.pid} {L._started(child.pid)}")
    assert L.is_stale(lock)
    child.wait()
    assert L.is_stale(lock)  # reaped: gone
    lock.write_text(f"{L.HOST} {os.getpid()}")  # a lock written before start times were recorded
    assert not L.is_stale(lock)


def test_a_second_waiter_never_removes_the_lock_a_first_took_over(tmp_path):
    """Two waiters judge one dead holder's lock stale. The first takes it over; the second, which
    judged the old lock (its inode), must leave the first's fresh lock in place."""
    lock = tmp_path / "task_00000.tokenize.lock"
    code = "import os; print(os.getpid())"
    dead = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    lock.write_text(f"{L.HOST} {int(dead.stdout)}")
    judged = lock.stat().st_ino  # the second waiter's view, before the first acts
    taken = []
    assert L.claim(lock, on_takeover=taken.append)  # the first waiter
    assert taken == [f"{L.HOST} {int(dead.stdout)}"]
    fresh = lock.read_text()
    assert not L._take_over(lock, judged)  # the second waiter, late
    assert lock.read_text() == fresh and not L.is_stale(lock)
    assert sorted(p.name for p in tmp_path.iterdir()) == [lock.name]  # nothing of the takeover left


def test_another_hosts_lock_is_stale_once_its_heartbeat_is_silent(tmp_path):
    lock = tmp_path / "task_00003.tokenize.lock"
    lock.write_text("othernode 12 345")
    assert not L.is_stale(lock)  # just touched: its holder may be working
    assert not L.claim(lock)
    old = time.time() - L.STALE_S - 5
    os.utime(lock, (old, old))
    assert L.is_stale(lock)
    taken = []
    assert L.claim(lock, on_takeover=taken.append) and taken == ["othernode 12 345"]
    assert lock.read_text().split()[:2] == [L.HOST, str(os.getpid())]


def test_a_held_lock_beats_and_is_released_only_if_still_ours(tmp_path, monkeypatch):
    monkeypatch.setattr(L, "HEARTBEAT_S", 0.05)
    lock = tmp_path / "tokenizer.lock"
    with L.held(lock) as ours:
        assert ours
        old = time.time() - 100
        os.utime(lock, (old, old))
        deadline = time.time() + 10
        while lock.stat().st_mtime < time.time() - 50 and time.time() < deadline:
            time.sleep(0.02)
        assert lock.stat().st_mtime > time.time() - 50  # touched again by the heartbeat
        with L.held(lock) as second:
            assert not second  # a live holder: busy
    assert not lock.exists()
    with L.held(lock) as ours:
        lock.unlink()
        lock.write_text("othernode 1 2")  # judged dead and taken over while we worked
    assert lock.read_text() == "othernode 1 2"  # not ours to remove


def test_a_link_that_went_through_unseen_is_ours(tmp_path):
    """On NFS a retried link whose first reply was lost fails with EEXIST although it made the lock:
    the lock is ours (both names on one inode), not another holder's to wait for forever."""
    lock = tmp_path / "task_00001.tokenize.lock"
    part = lock.with_name(f"{lock.name}.{L.HOST}-{os.getpid()}")
    part.write_text(L.me())
    os.link(part, lock)  # the first link, done; its reply lost
    assert L.claim(lock)
    assert lock.read_text() == L.me() and not part.exists()


def test_the_heartbeat_survives_a_missed_beat(tmp_path, monkeypatch):
    """A waiter's takeover check may move the lock away for a moment: the beats go on after."""
    monkeypatch.setattr(L, "HEARTBEAT_S", 0.05)
    lock = tmp_path / "tokenizer.lock"
    with L.held(lock) as ours:
        assert ours
        away = lock.with_name("moved")
        lock.rename(away)
        time.sleep(0.3)  # several beats miss
        away.rename(lock)
        old = time.time() - 100
        os.utime(lock, (old, old))
        deadline = time.time() + 10
        while lock.stat().st_mtime < time.time() - 50 and time.time() < deadline:
            time.sleep(0.02)
        assert lock.stat().st_mtime > time.time() - 50
