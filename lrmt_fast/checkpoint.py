"""Checkpoint and result files: written atomically, read without running code, one-line errors.

Writing (:func:`atomic_save` for torch objects, :func:`atomic_write_json`,
:func:`atomic_write_text`, :func:`atomic_write_bytes`): the data goes to a temporary file with a unique name beside the
target (``tempfile.mkstemp``, so two writers of the same file never share a temp file), is
fsync'ed and moved into place with :func:`os.replace`. A crash, a full disk or a missing
permission therefore never leaves a half-written file where a good one was. On any failure the
temporary file is removed (a full disk used to keep a 6.6 MB ``meta_ckpt.pt.tmp``) and
:class:`WriteError` names the file and the cause in one line ("no space left on device",
"permission denied"), where torch alone said "[enforce fail at inline_container.cc:672]
unexpected pos" with no file name.

Reading (:func:`load_checkpoint`): ``torch.load(weights_only=True)``. A pickle can name any
Python callable, and ``weights_only=False`` calls it while loading: a crafted ``.pt`` ran
``os.makedirs`` (or anything else) before any check could look at it. lrmt_fast writes only
dicts of tensors, numbers, strings, bools, None, lists, tuples and nested dicts (meta and Task A
checkpoints, Adam and SGD state dicts, dataclass configs as dicts, generator states as byte
tensors); torch's default weights-only set covers all of these
(``torch.serialization.get_unsafe_globals_in_checkpoint`` finds no other global in the meta
checkpoints, Task A checkpoints and pretraining ``.partial`` files the project writes, nor in
the shipped ones), so no extra global is allowed. A file that needs one is refused with a line
naming the file and the global.
"""
from __future__ import annotations

import errno as _errno
import json
import os
import pickle
import re
import tempfile
from typing import Any, Callable, Iterable, List, Optional, Tuple

import torch


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, unreadable, unsafe to load, or not what was expected."""


class WriteError(CheckpointError):
    """A file could not be written (disk full, no permission, ...); the target is unchanged.

    A :class:`CheckpointError`, so that the CLI reports it as a user error in one line;
    ``path`` is the target and ``errno`` the OS error number when one is known."""

    def __init__(self, msg: str, path: str, errno: Optional[int] = None):
        super().__init__(msg)
        self.path = path
        self.errno = errno


# A failure that leaves less free space than the data still needed (plus this margin) is
# taken for a full disk when torch reports it without an errno.
_FREE_MARGIN = 1 << 20


def _new_file_mode(path: str) -> int:
    """The mode a plain ``open(path, 'w')`` would give: the old file's, or 0o666 minus the umask.

    ``mkstemp`` creates 0o600 files; a checkpoint on a shared filesystem must stay readable by
    the other users and nodes that could read the file it replaces."""
    try:
        return os.stat(path).st_mode & 0o7777
    except OSError:
        pass
    umask = None
    try:
        with open("/proc/self/status") as f:      # Linux >= 4.7: read without changing it
            for line in f:
                if line.startswith("Umask:"):
                    umask = int(line.split()[1], 8)
                    break
    except (OSError, ValueError):
        pass
    if umask is None:   # elsewhere: os.umask is the only way to read it
        umask = os.umask(0o022)
        os.umask(umask)
    return 0o666 & ~umask


def _errno_of(e: BaseException) -> Optional[int]:
    """The OS error number of ``e`` or of the exception it was raised from, if any."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno:
            return e.errno
        e = e.__cause__ or e.__context__
    return None


def _free_bytes(d: str) -> Optional[int]:
    try:
        st = os.statvfs(d)
    except (OSError, AttributeError):
        return None
    return st.f_bavail * st.f_frsize


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def _write_cause(e: BaseException, d: str, need: int, written: int) -> Tuple[str, Optional[int]]:
    """(cause in words, errno) for a failed write into folder ``d``; called while the
    temporary file (``written`` bytes so far) still exists."""
    err = _errno_of(e)
    if err is None:
        # torch's zip writer reports a failed write as RuntimeError("[enforce fail at
        # inline_container.cc:...] unexpected pos ...") without an errno: look at the disk.
        free = _free_bytes(d)
        if free is not None and free < max(0, need - written) + _FREE_MARGIN:
            return (f"no space left on device ({_mb(free)} free in {d}, about {_mb(need)} needed)",
                    _errno.ENOSPC)
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        return f"{type(e).__name__}: {msg}", None
    cause = os.strerror(err).lower()
    if err in (_errno.ENOSPC, _errno.EDQUOT):
        free = _free_bytes(d)
        if free is not None:
            cause += f" ({_mb(free)} free in {d}, about {_mb(need)} needed)"
    elif err in (_errno.EACCES, _errno.EPERM, _errno.EROFS):
        cause += f" (writing in {d})"
    return cause, err


def _atomic_write(path, write: Callable[[Any], None], what: str, need: int) -> None:
    """Write ``path`` through ``write(binary file)``: unique temp file beside it, fsync,
    os.replace; on failure remove the temp file and raise :class:`WriteError`."""
    path = os.fspath(path)
    d = os.path.dirname(os.path.abspath(path))
    tmp = None
    try:
        os.makedirs(d, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=d)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _new_file_mode(path))
        os.replace(tmp, path)
        tmp = None
    except BaseException as e:
        written = 0
        if tmp is not None:
            try:
                written = os.path.getsize(tmp)
            except OSError:
                pass
        cause, err = _write_cause(e, d, need, written) if isinstance(e, Exception) else ("", None)
        if tmp is not None:
            try:
                os.remove(tmp)
            except OSError:
                pass
        if not isinstance(e, Exception):    # KeyboardInterrupt, SystemExit: cleaned up, as they were
            raise
        raise WriteError(f"could not write {what} {path}: {cause}; the previous file, if any, is unchanged",
                         path, err) from e
    try:    # make the rename itself durable (best effort: not every filesystem allows it)
        dfd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


def _tensor_bytes(obj) -> int:
    """Bytes of the tensor storages in ``obj`` (dicts, lists, tuples): what torch.save writes, about."""
    if isinstance(obj, torch.Tensor):
        return obj.untyped_storage().nbytes()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def atomic_save(obj, path: str, *, what: str = "checkpoint") -> None:
    """``torch.save(obj, path)`` atomically; :class:`WriteError` (naming ``path``) on failure."""
    _atomic_write(path, lambda f: torch.save(obj, f), what, _tensor_bytes(obj))


def atomic_save_figure(fig, path: str, dpi: int = 110) -> None:
    """``fig.savefig(path)`` atomically (format from the extension, PNG by default); :class:`WriteError`
    naming ``path`` on failure."""
    fmt = os.path.splitext(path)[1].lstrip(".") or "png"
    _atomic_write(path, lambda f: fig.savefig(f, format=fmt, dpi=dpi), "figure", 1 << 20)


def atomic_write_text(path: str, text: str, *, what: str = "file", encoding: str = "utf-8") -> None:
    """Write ``text`` to ``path`` atomically (results, tables); :class:`WriteError` on failure."""
    data = text.encode(encoding)
    _atomic_write(path, lambda f: f.write(data), what, len(data))


def atomic_write_bytes(path: str, data: bytes, *, what: str = "file") -> None:
    """Write ``data`` to ``path`` atomically (figures); :class:`WriteError` on failure."""
    data = bytes(data)
    _atomic_write(path, lambda f: f.write(data), what, len(data))


def atomic_write_json(path: str, obj, *, what: str = "file", indent: Optional[int] = 2, **dumps_kw) -> None:
    """Write ``obj`` as JSON (plus a final newline) to ``path`` atomically.

    The object is serialised first, so a value JSON cannot hold raises ``TypeError`` before
    anything is written; a failed write raises :class:`WriteError`."""
    atomic_write_text(path, json.dumps(obj, indent=indent, **dumps_kw) + "\n", what=what)


def _unsafe_globals(path: str, e: BaseException) -> List[str]:
    """The globals a refused weights-only load wanted: from the file (zip checkpoints) or
    from torch's message (legacy format)."""
    names: List[str] = []
    finder = getattr(torch.serialization, "get_unsafe_globals_in_checkpoint", None)
    if finder is not None:
        try:    # reads the pickle's opcodes; calls nothing
            names = list(finder(path))
        except Exception:
            names = []
    if not names:
        names = re.findall(r"GLOBAL ([\w.]+)", str(e))
    return names


def _first_line(e: BaseException) -> str:
    s = str(e).strip()
    return f"{type(e).__name__}: {s.splitlines()[0]}" if s else type(e).__name__


def load_checkpoint(path: str, required: Iterable[str] = (), what: str = "checkpoint",
                    map_location="cpu", *, owned: bool = True) -> dict:
    """Load a dict checkpoint with ``torch.load(weights_only=True)``; raise
    :class:`CheckpointError` naming the file and the fault, in one line.

    ``owned``: the file is one lrmt_fast wrote into its own output or cache folder, so a
    corrupt one (an interrupted copy, a full disk before atomic writes) can be deleted and
    rebuilt, and the message says so. ``owned=False`` for a file the user named (e.g. a Task A
    checkpoint given on the command line): the message then says it is not a valid ``what``
    and what was expected, and does not suggest deleting the user's file."""
    required = list(required)
    if not os.path.exists(path):
        raise CheckpointError(f"{what} not found: {path}")
    if os.path.isdir(path):
        raise CheckpointError(f"{what} {path} is a folder; expected a checkpoint file")
    expected = ("expected a torch checkpoint written by lrmt_fast"
                + (f" (a dict with the keys {required})" if required else ""))
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises many types for a damaged or refused file
        if isinstance(e, pickle.UnpicklingError) and "weights only" in str(e).lower():
            names = _unsafe_globals(path, e)
            if names:
                more = f" (and {len(names) - 1} more)" if len(names) > 1 else ""
                raise CheckpointError(f"{what} {path} needs the Python object {names[0]}{more} to load; "
                                      f"lrmt_fast loads only tensors and plain data (weights_only); "
                                      f"refusing") from None
            m = re.search(r"WeightsUnpickler error: (.*)", str(e))
            detail = m.group(1).strip() if m else _first_line(e)
            raise CheckpointError(f"{what} {path} holds more than tensors and plain data ({detail}); "
                                  f"lrmt_fast loads only those (weights_only); refusing") from None
        if owned:
            raise CheckpointError(f"{what} {path} is corrupt or not a torch checkpoint ({_first_line(e)}); "
                                  f"delete it to start again") from None
        raise CheckpointError(f"{path} is not a valid {what} ({_first_line(e)}); {expected}") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{what} {path} holds a {type(obj).__name__}, expected a dict")
    missing = [k for k in required if k not in obj]
    if missing:
        raise CheckpointError(f"{what} {path} lacks the keys {missing}; it was not written by lrmt_fast "
                              f"or is from an incompatible version")
    return obj

