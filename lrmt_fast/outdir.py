"""One run at a time per output folder: :class:`OutDirLock`.

Two runs writing the same ``--out`` interleave their checkpoints, results and figures (each
file is written atomically, but a resumed meta-training can read the other run's checkpoint,
and ``results.json`` ends up from whichever finished last). The lock is ``fcntl.flock`` on
``<out>/.lrmt.lock``: the kernel releases it when the holder's file is closed, so also when
the process ends in any way (an exception, Ctrl-C, SIGKILL, a crash of the machine's process)
and a stale lock cannot outlive its run. The file holds the holder's PID, host, command line
and start time, for the one-line message the next run gets.

Under torchrun only the rank that writes (rank 0) should take the lock. ``flock`` works on
local filesystems and on NFS (Linux emulates it with POSIX locks there); on a filesystem
without locks :class:`OutDirLock` raises the OSError ``flock`` gives.
"""
from __future__ import annotations

import datetime
import errno
import fcntl
import json
import os
import shlex
import socket
import sys
import time
from typing import Optional, Sequence

LOCK_NAME = ".lrmt.lock"


class OutDirBusyError(RuntimeError):
    """The output folder is locked by another run (message: the folder and the holder)."""

    def __init__(self, msg: str, out_dir: str, holder: dict):
        super().__init__(msg)
        self.out_dir = out_dir
        self.holder = holder


def command_line(argv: Optional[Sequence[str]] = None) -> str:
    """The command as a user would recognise it: ``lrmt exp1-mnist --out ...`` for the console
    script, ``python -m lrmt_fast ...`` for the module (sys.argv[0] is then ``__main__.py``)."""
    argv = list(sys.argv if argv is None else argv) or ["python"]
    prog = os.path.basename(argv[0])
    if prog == "__main__.py":
        prog = f"python -m {os.path.basename(os.path.dirname(os.path.abspath(argv[0])))}"
    elif prog.endswith(".py"):
        prog = f"python {argv[0]}"
    cmd = " ".join([prog] + [shlex.quote(a) for a in argv[1:]])
    return cmd if len(cmd) <= 300 else cmd[:297] + "..."


def _read_holder(fd: int) -> dict:
    """The holder's record, or {} when it is not (yet) readable: the holder writes it right
    after taking the lock, so a reader that comes in between retries briefly."""
    for _ in range(20):
        try:
            os.lseek(fd, 0, os.SEEK_SET)
            raw = os.read(fd, 65536).decode("utf-8", "replace")
            holder = json.loads(raw) if raw.strip() else {}
            if isinstance(holder, dict) and holder:
                return holder
        except (OSError, ValueError):
            pass
        time.sleep(0.05)
    return {}


def busy_message(out_dir: str, holder: dict) -> str:
    """``runs/x is in use by process 1234 (lrmt exp1-mnist ...) on host h since 2026-...; wait
    for it or use another --out``"""
    who = f"process {holder['pid']}" if holder.get("pid") else "another process"
    if holder.get("command"):
        who += f" ({holder['command']})"
    if holder.get("host"):
        who += f" on host {holder['host']}"
    if holder.get("since"):
        who += f" since {holder['since']}"
    return f"{out_dir} is in use by {who}; wait for it or use another --out"


class OutDirLock:
    """Exclusive use of an output folder for the life of a ``with`` block (or acquire/release).

    ``OutDirLock(out).acquire()`` creates ``out`` if needed, takes ``flock(LOCK_EX | LOCK_NB)``
    on ``out/.lrmt.lock`` and writes the holder record; if another process holds it, raises
    :class:`OutDirBusyError` at once (no waiting: a second run on a busy folder is a mistake to
    report, not a queue). A second lock on the same folder in the same process is refused too.
    """

    def __init__(self, out_dir: str, command: Optional[str] = None):
        self.out_dir = out_dir
        self.path = os.path.join(out_dir, LOCK_NAME)
        self.command = command
        self._fd: Optional[int] = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> "OutDirLock":
        if self._fd is not None:
            return self
        os.makedirs(self.out_dir, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                os.close(fd)
                raise
            holder = _read_holder(fd)
            os.close(fd)
            raise OutDirBusyError(busy_message(self.out_dir, holder), self.out_dir, holder) from None
        try:
            record = {"pid": os.getpid(), "host": socket.gethostname(),
                      "command": self.command if self.command is not None else command_line(),
                      "since": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
            data = (json.dumps(record) + "\n").encode()
            os.ftruncate(fd, 0)
            os.pwrite(fd, data, 0)
        except BaseException:
            os.close(fd)    # releases the lock
            raise
        self._fd = fd
        return self

    def release(self) -> None:
        """Empty the record and drop the lock (the file stays: removing it would let two runs
        lock two different files of the same name)."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            os.ftruncate(fd, 0)
        except OSError:
            pass
        os.close(fd)

    def __enter__(self) -> "OutDirLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def __del__(self):
        try:
            self.release()
        except Exception:
            pass
