"""Atomic writes: a file or a whole folder appears complete under its final name, or not at all.

Both are written under a temporary name beside the target (the same filesystem, so the last step
is a single rename), fsynced (the data, then the folder entries), then renamed over the target::

    .<name>.<pid>.<random>.tmp  --write, fsync-->  --rename (folders: exchange)-->  <name>

A kill -9 at any moment leaves the previous version or the new one at ``<name>``, never a mix.
A folder replaces an existing one with Linux's ``renameat2(RENAME_EXCHANGE)``, which swaps both
names in one step; where that is missing (macOS, some network filesystems) the old folder is first
renamed to ``.<name>.<pid>.<random>.old``, and a crash between the two renames is undone by the
next write of the same target. Temporary names carry the writer's process id: the next write
removes those whose writer is dead (POSIX only). A write the disk refuses for lack of space raises
``SaveError`` naming the target, and the previous version stays.

What is written gets the permissions a plain ``open``/``mkdir`` would give under the process umask
(``honour_umask``): temporary names start private (0600/0700), and safetensors writes its files 0600.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

from deltatune.errors import SaveError

# errno values that mean "no room for these bytes": a full disk, a full quota, a file size limit.
_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


@contextlib.contextmanager
def atomic_file(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; when the block succeeds, fsync it and rename it over
    ``target``. On failure the temporary file is removed and ``target`` is untouched::

        with atomic_file(folder / "config.json") as tmp:
            tmp.write_text(text)
    """
    target = Path(target)
    _remove_stale(target)
    handle, name = tempfile.mkstemp(prefix=_prefix(target), suffix=".tmp", dir=target.parent)
    os.close(handle)
    tmp = Path(name)
    with _cleaned_up_on_failure(tmp, target):
        yield tmp
        honour_umask(tmp)  # after the block: a writer may have replaced the file (safetensors does, at 0600)
        fsync_path(tmp)
    os.replace(tmp, target)
    fsync_path(target.parent)


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty staging folder beside ``target``; when the block succeeds, fsync everything in it
    and swap it in for ``target`` whole (a merged model, a checkpoint). On failure the staging folder
    is removed and ``target`` is untouched::

        with atomic_directory("outputs/merged") as staging:
            model.save_pretrained(staging)
            tokenizer.save_pretrained(staging)
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(target)
    staging = Path(tempfile.mkdtemp(prefix=_prefix(target), suffix=".tmp", dir=target.parent))
    with _cleaned_up_on_failure(staging, target):
        yield staging
        honour_umask(staging)
        _fsync_tree(staging)
    _swap_in(staging, target)


def fsync_path(path: str | os.PathLike) -> None:
    """fsync a file or a folder (its entries), so what was written survives a power loss."""
    path = Path(path)
    flags = os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0)
    descriptor = os.open(path, flags)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _prefix(target: Path) -> str:
    return f".{target.name}.{os.getpid()}."


def honour_umask(path: str | os.PathLike) -> None:
    """Give ``path`` (and, for a folder, everything under it) the permissions a plain ``open`` or
    ``mkdir`` would have under the process umask: folders and executables 0777, other files 0666, less
    the umask (0755 and 0644 under umask 022). Symbolic links are left alone."""
    umask = current_umask()
    for entry in _tree(Path(path)):
        mode = entry.lstat().st_mode
        if stat.S_ISLNK(mode):
            continue
        full = 0o777 if stat.S_ISDIR(mode) or mode & 0o111 else 0o666
        os.chmod(entry, full & ~umask)


def current_umask() -> int:
    """The process umask, read from /proc/self/status where it is (Linux); else set and restored, which
    another thread could notice for an instant."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    umask = os.umask(0o077)
    os.umask(umask)
    return umask


def _tree(path: Path) -> Iterator[Path]:
    """``path``, then (for a real folder) every entry under it; links are not followed."""
    yield path
    if path.is_dir() and not path.is_symlink():
        for root, folders, files in os.walk(path):
            yield from (Path(root) / name for name in (*folders, *files))


@contextlib.contextmanager
def _cleaned_up_on_failure(temporary: Path, target: Path) -> Iterator[None]:
    """Remove ``temporary`` when the block raises; a lack of space becomes a ``SaveError``."""
    try:
        yield
    except BaseException as exc:
        error = None if isinstance(exc, SaveError) else _space_error(exc, temporary.parent, target)
        _remove(temporary)  # after the check above: removing it frees the space the check looks for
        if error is None:
            raise
        raise error from exc


def _space_error(exc: BaseException, folder: Path, target: Path) -> SaveError | None:
    """A one-line ``SaveError`` when ``exc`` means the disk had no room for the write, else None.

    OSError carries an errno; safetensors words it "... (os error 28)"; torch.save only says
    "unexpected pos ...", so for anything else the filesystem itself is asked whether it is full.
    """
    if not isinstance(exc, Exception):
        return None
    reason = None
    if isinstance(exc, OSError) and exc.errno in _SPACE_ERRNOS:
        reason = os.strerror(exc.errno)
    for number in _SPACE_ERRNOS:
        if reason is None and (f"(os error {number})" in str(exc) or os.strerror(number) in str(exc)):
            reason = os.strerror(number)
    with contextlib.suppress(OSError):
        if reason is None and os.statvfs(folder).f_bavail == 0:
            reason = os.strerror(errno.ENOSPC)
    if reason is None:
        return None
    return SaveError(
        f"could not write {target}: {reason}; free space on that disk and save again (the previous version is kept)"
    )


def _swap_in(staging: Path, target: Path) -> None:
    """Put the complete folder ``staging`` at ``target``, replacing what is there in one step."""
    if not os.path.lexists(target):
        os.rename(staging, target)
    else:
        try:
            _exchange(staging, target)
        except OSError as exc:
            if exc.errno not in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                raise
            _replace_in_two_steps(staging, target)
        else:
            _remove(staging)  # it holds the previous version now
    fsync_path(target.parent)


def _exchange(first: Path, second: Path) -> None:
    """Swap two paths atomically with Linux's ``renameat2(RENAME_EXCHANGE)``; ENOSYS where it is missing."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        raise OSError(errno.ENOSYS, "renameat2 is not available on this system")
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second), _RENAME_EXCHANGE) != 0:
        number = ctypes.get_errno()
        raise OSError(number, os.strerror(number), str(second))


def _replace_in_two_steps(staging: Path, target: Path) -> None:
    """Without an atomic exchange: move the old folder aside, move the new one in, drop the old one.
    A crash between the two renames is undone by ``_remove_stale`` on the next write."""
    aside = Path(tempfile.mkdtemp(prefix=_prefix(target), suffix=".old", dir=target.parent))
    aside.rmdir()
    os.rename(target, aside)
    os.rename(staging, target)
    _remove(aside)


def _remove_stale(target: Path) -> None:
    """Remove the temporary files and folders of dead writers of ``target``; put back a previous
    version that a crash left moved aside (``.old``) while ``target`` is missing."""
    if os.name != "posix" or not target.parent.is_dir():
        return
    pattern = re.compile(rf"^\.{re.escape(target.name)}\.(\d+)\.[^.]+\.(tmp|old)$")
    for entry in sorted(target.parent.iterdir()):
        match = pattern.match(entry.name)
        if not match or _alive(int(match.group(1))):
            continue
        if match.group(2) == "old" and not os.path.lexists(target):
            os.rename(entry, target)
        else:
            _remove(entry)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _fsync_tree(folder: Path) -> None:
    """fsync every file under ``folder``, then every folder, deepest first."""
    for root, _, files in os.walk(folder, topdown=False):
        for name in files:
            fsync_path(Path(root) / name)
        fsync_path(Path(root))
