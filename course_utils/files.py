"""Reading and writing files in folders that other people can write to (a shared checkpoint
folder, ``/tmp``): what a run writes or reads can't be turned against the person who runs it.

- **Temporary names nobody can guess.** A file or folder is written under a fresh name that
  ``tempfile`` creates exclusively (``O_EXCL``, never through a symlink), then renamed over its
  target. A symlink planted at a predictable name (``.latest.pt.<pid>.tmp``) is never followed.
- **Targets that are what they claim.** A rename replaces only a regular file (a folder, for a
  folder) or nothing: a symlink, a FIFO or a device node such as ``/dev/null`` is refused in one
  line (:class:`UnsafeFile`), and the temporary file is removed.
- **Reads that can't hang.** :func:`read_regular` refuses what is not a regular file without
  opening it, so a FIFO where a checkpoint should be is an error, not a wait for ever.
- **One run per folder.** :func:`locked` takes ``flock`` on the folder itself for as long as a
  run writes there; a second run is refused (:class:`Busy`). The lock goes with the process, even
  when it is killed, and it needs no file of its own (nothing to plant, nothing left behind).
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Callable
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import BinaryIO

from course_utils.launch import processes


class WriteError(OSError):
    """A file that could not be written (a full disk): the reason, in one line."""


class UnsafeFile(WriteError):
    """A path that is not what a run may read or replace (a symlink, a FIFO, a device)."""


class Busy(OSError):
    """A folder that another run holds (:func:`locked`)."""


def kind(mode: int) -> str:
    """What a ``st_mode`` is, in words: "a regular file", "a folder", "a symlink", ..."""
    for test, words in (
        (stat.S_ISREG, "a regular file"),
        (stat.S_ISDIR, "a folder"),
        (stat.S_ISLNK, "a symlink"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return words
    return "a device"


def refuse_unsafe_target(path: str | Path, what: str, folder: bool = False) -> None:
    """Raise :class:`UnsafeFile` unless ``path`` is absent or a regular file (a folder when
    ``folder``): what may be replaced by a rename. Never follows a symlink."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not (stat.S_ISDIR(mode) if folder else stat.S_ISREG(mode)):
        wanted = "a folder" if folder else "a regular file"
        raise UnsafeFile(f"{what} {path} is {kind(mode)}, not {wanted}: refused (remove it)")


def read_regular(path: str | Path, what: str = "") -> bytes:
    """The bytes of ``path``, refused (:class:`UnsafeFile`) when it is not a regular file: a
    symlink, a FIFO or a device is never opened (and so never blocks)."""
    what = what or Path(path).name
    mode = os.lstat(path).st_mode
    if not stat.S_ISREG(mode):
        raise UnsafeFile(f"{what} is {kind(mode)}, not a regular file")
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        fd = os.open(path, flags)
    except OSError as err:
        if err.errno == errno.ELOOP:  # swapped for a symlink since the look
            raise UnsafeFile(f"{what} is a symlink, not a regular file") from None
        raise
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):  # swapped since the look
            raise UnsafeFile(f"{what} is not a regular file")
        return f.read()


def _umask() -> int:
    """This process's umask (Linux reports it; elsewhere the usual 022)."""
    with suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    return 0o022


def temporary_name(target: Path) -> str:
    """The prefix of ``target``'s temporary names: ``.NAME.PID.`` (then tempfile's random part
    and ``.tmp``); the PID tells :func:`sweep` whether the writer still runs."""
    return f".{target.name}.{os.getpid()}."


def atomic_write(
    path: str | Path,
    write: Callable[[BinaryIO], object],
    what: str,
    before_replace: Callable[[], object] | None = None,
) -> Path:
    """Write ``path`` through a temporary file in its folder: ``write(f)``, flushed to disk, then
    ``before_replace()`` (e.g. keep the file it replaces), then a rename over ``path``. Refuses
    a target that is not a regular file (:class:`UnsafeFile`), before writing and again just
    before the rename. On any failure (:class:`WriteError`, one line) the temporary file is
    removed and the target left as it was."""
    path, tmp = Path(path), None
    refuse_unsafe_target(path, what)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=temporary_name(path), suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # what a plain open() would have given it
        if before_replace is not None:
            before_replace()
        refuse_unsafe_target(path, what)
        os.replace(tmp, path)
    except BaseException as err:
        if tmp is not None:
            with suppress(FileNotFoundError):
                os.unlink(tmp)
        if isinstance(err, OSError) and not isinstance(err, WriteError):
            raise WriteError(f"can't write {what} {path}: {err.strerror or err}") from None
        raise
    return path


def write_json(path: str | Path, obj, what: str = "--json") -> Path:
    """Write ``obj`` as strict JSON (no NaN, no Infinity: ValueError), atomically: a crash
    never leaves half a file behind, and only a regular file (or a new name) is replaced."""
    text = json.dumps(obj, indent=1, allow_nan=False).encode()
    return atomic_write(path, lambda f: f.write(text), what)


def temporary_folder(target: Path) -> Path:
    """A new, empty folder beside ``target`` under a name nobody could have guessed, to be
    filled and then renamed over ``target`` (see :func:`replace_folder`)."""
    tmp = Path(tempfile.mkdtemp(prefix=temporary_name(target), suffix=".tmp", dir=target.parent))
    os.chmod(tmp, 0o777 & ~_umask())
    return tmp


def replace_folder(tmp: Path, target: Path, what: str) -> None:
    """Rename the folder ``tmp`` over ``target``, which must be absent or a folder (removed)."""
    refuse_unsafe_target(target, what, folder=True)
    if target.exists():
        shutil.rmtree(target)  # refuses a symlink, and never follows one inside
    os.replace(tmp, target)


def sweep(folder: Path, name: str) -> None:
    """Remove the temporary files and folders of ``name`` that a killed writer left in
    ``folder`` (writers still running keep theirs). Nothing is followed: a symlink or a FIFO
    with such a name is left alone."""
    pattern = re.compile(rf"\.{re.escape(name)}\.(\d+)(\.\w+)?\.tmp")
    with os.scandir(folder) as entries:
        found = [(entry, pattern.fullmatch(entry.name)) for entry in entries]
    for entry, match in found:
        if not match or processes.alive(int(match.group(1))):
            continue
        with suppress(FileNotFoundError):
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            elif entry.is_file(follow_symlinks=False):
                os.unlink(entry.path)


@contextmanager
def locked(folder: str | Path, what: str):
    """Hold an exclusive ``flock`` on ``folder`` (created if need be) while the block runs;
    :class:`Busy` when another process holds it. On a file system without locks (some network
    ones, or Windows) the block runs unlocked: yields False then, True when locked."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # not POSIX
        yield False
        return
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            held = True
        except BlockingIOError:
            raise Busy(
                f"another run is using {what} {folder} (it holds the folder's lock): wait for "
                "it to end, or give another folder"
            ) from None
        except OSError:  # no locks on this file system
            held = False
        yield held
    finally:
        os.close(fd)
