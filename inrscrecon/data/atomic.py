"""Outputs that appear only when complete: checked before work, written to a temporary sibling, renamed.

``atomic_path`` / ``atomic_output`` give a temporary next to the final path; :func:`commit` renames it onto
the final path (a folder replaces the old folder whole). Temporaries still pending are removed on error, on
SIGINT / SIGTERM / SIGHUP and at exit (:func:`install_cleanup`), and what a killed writer left (``kill -9``) is
swept by the next write of the same output, so an interrupted command leaves the old state or the complete
new one. Folders made for outputs (:func:`check_writable`) are removed again when a command fails
(:func:`discard_created`). The registries below are this module's only state.
"""

from __future__ import annotations

import atexit
import glob
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from inrscrecon.errors import InputError

_PENDING: set[Path] = set()  # temporaries being written; removed on error, SIGINT/SIGTERM and exit
_CREATED: list[
    Path
] = []  # output folders made by check_writable; removed again by discard_created() if empty
_LOCK = threading.Lock()
_HANDLERS_INSTALLED = False
_TERMINATING: list[int] = []  # exit status once SIGTERM/SIGHUP arrived: no new output is started after it


def check_writable(path: str | Path, directory: bool = False) -> Path:
    """Raise InputError unless ``path`` can be written: its folder exists (or can be made) and accepts a file,
    and (``directory=False``) ``path`` is not an existing folder. Folders made here are recorded so that a
    failed command can remove them again (:func:`discard_created`)."""
    path = Path(path)
    if not directory and path.is_dir():
        raise InputError(f"{path}: is an existing directory; --out must be a file path")
    if directory and path.exists() and not path.is_dir():
        raise InputError(f"{path}: exists and is not a directory")
    parent = path.parent if str(path.parent) else Path(".")
    missing = [p for p in [parent, *parent.parents] if not p.exists()]
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"{path}: cannot create output folder {parent} ({exc.strerror})") from None
    with _LOCK:
        _CREATED.extend(p for p in reversed(missing) if p not in _CREATED)
    try:  # os.access is not enough (root, read-only mounts, /proc): try it
        fd, probe = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".probe", dir=parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise InputError(f"{path}: output folder {parent} is not writable ({exc.strerror})") from None
    return path


def forget_created() -> None:
    """Start a new command: folders made so far are kept whatever happens next."""
    with _LOCK:
        _CREATED.clear()


def discard_created() -> None:
    """Remove the output folders made by :func:`check_writable` that are still empty (deepest first)."""
    with _LOCK:
        created, _CREATED[:] = list(_CREATED), []
    for p in reversed(created):
        try:
            p.rmdir()
        except OSError:
            pass  # not empty (something complete was written there) or already gone


def _remove(tmp: Path) -> None:
    if tmp.is_dir() and not tmp.is_symlink():
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        tmp.unlink(missing_ok=True)


def remove_pending() -> None:
    """Remove every temporary output still being written (on error, signal or exit)."""
    with _LOCK:
        pending = list(_PENDING)
        _PENDING.clear()
    for tmp in pending:
        _remove(tmp)


class Terminated(SystemExit):
    """Raised in the main thread on SIGTERM/SIGHUP after the pending temporaries are removed."""


def _on_signal(signum: int, frame: object) -> None:
    remove_pending()
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    _TERMINATING.append(128 + signum)
    _exit_soon(128 + signum)
    raise Terminated(128 + signum)


def _exit_soon(code: int, grace_s: float = 5.0) -> None:
    """Exit with ``code`` after ``grace_s`` unless the process has ended by then: an exception raised by a
    signal handler is swallowed when it lands in a finaliser (``__del__``, weakref callbacks)."""

    def later() -> None:
        time.sleep(grace_s)
        remove_pending()
        os._exit(code)

    threading.Thread(target=later, name="inrscrecon-exit", daemon=True).start()


def install_cleanup() -> None:
    """Remove pending temporaries on SIGINT/SIGTERM/SIGHUP and at exit (idempotent; main thread only,
    elsewhere the exit hook alone is installed)."""
    global _HANDLERS_INSTALLED
    if _HANDLERS_INSTALLED:
        return
    _HANDLERS_INSTALLED = True
    atexit.register(remove_pending)
    previous_hook = sys.unraisablehook

    def quiet_termination(unraisable) -> None:  # a signal landing in a finaliser: _exit_soon ends the process
        if not isinstance(unraisable.exc_value, Terminated | KeyboardInterrupt):
            previous_hook(unraisable)

    sys.unraisablehook = quiet_termination
    if threading.current_thread() is not threading.main_thread():
        return
    for sig in (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGHUP", None)):
        if sig is None:
            continue
        current = signal.getsignal(sig)
        if sig == signal.SIGINT and current is not signal.default_int_handler:
            continue  # someone else handles Ctrl-C; the finally blocks still remove the temporaries
        if sig != signal.SIGINT and current not in (signal.SIG_DFL, None):
            continue
        signal.signal(sig, _on_signal)


def _host() -> str:
    return socket.gethostname().replace(".", "_").replace("/", "_")


def _owner_tag() -> str:
    return f"{_host()}-{os.getpid()}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_stale(path: Path) -> list[Path]:
    """Remove temporaries of ``path`` left by a process of this host that no longer runs (``kill -9``, power
    loss: no handler ran). Temporaries are named ``.NAME.HOST-PID.RANDOM.tmp``. Returns what was removed."""
    host = _host()
    removed = []
    for p in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        tag = p.name[len(path.name) + 2 :].split(".", 1)[0]
        owner, _, pid = tag.rpartition("-")
        if owner == host and pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            _remove(p)
            removed.append(p)
    return removed


def atomic_path(path: str | Path, directory: bool = False) -> tuple[Path, Path]:
    """(final path, temporary sibling): write the temporary (a file, or a folder with ``directory=True``), then
    :func:`commit` it. Until then it is pending: removed by :func:`discard`, on SIGINT/SIGTERM and at exit;
    what a killed process left is swept by the next write of the same output (:func:`sweep_stale`)."""
    if _TERMINATING:  # the signal's exception was swallowed somewhere: stop at the next write instead
        raise Terminated(_TERMINATING[0])
    path = check_writable(path, directory=directory)
    install_cleanup()
    sweep_stale(path)
    prefix = f".{path.name}.{_owner_tag()}."
    if directory:
        tmp = Path(tempfile.mkdtemp(prefix=prefix, suffix=".tmp", dir=path.parent))
    else:
        fd, name = tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=path.parent)
        os.close(fd)
        tmp = Path(name)
    with _LOCK:
        _PENDING.add(tmp)
    return path, tmp


def commit(tmp: Path, final: Path) -> None:
    """Move a finished temporary onto ``final`` (a folder replaces the old folder as a whole)."""
    if final.is_dir() and not final.is_symlink():
        trash = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
        os.replace(final, trash / final.name)
        os.replace(tmp, final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, final)
    with _LOCK:
        _PENDING.discard(tmp)


def discard(tmp: Path) -> None:
    """Remove a temporary that will not be committed (no-op once committed)."""
    with _LOCK:
        _PENDING.discard(tmp)
    if tmp.exists() or tmp.is_symlink():
        _remove(tmp)


@contextmanager
def atomic_output(path: str | Path, directory: bool = False) -> Iterator[Path]:
    """``with atomic_output(out) as tmp: write(tmp)``: ``tmp`` replaces ``out`` when the block completes;
    on an exception (or a signal) it is removed and ``out`` is untouched."""
    final, tmp = atomic_path(path, directory)
    try:
        yield tmp
        commit(tmp, final)
    finally:
        discard(tmp)
