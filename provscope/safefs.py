"""Files and directories that other local users cannot redirect, read or plant.

provscope keeps sockets, pid/lock files, spools and SQLite files in directories that
may sit in shared places (``/tmp``), and an agent may run as root. So every directory
provscope keeps state in is checked before use, and every file it creates is created
without following symlinks and with an owner-only mode, whatever the umask:

- ``private_dir(path)``: create ``path`` (mode 0700) when missing, then refuse it unless
  it is a real directory (not a symlink), owned by this process's effective user, and
  neither group- nor world-writable. A refusal is ``UnsafePath``, one line naming the
  path, what is wrong and what to do.
- ``open_private(path, flags)``: ``os.open`` with ``O_NOFOLLOW`` (a symlink is refused,
  so a planted ``agent.pid -> /etc/shadow`` is never written through), mode 0600 set
  with ``fchmod`` (umask-independent), and the opened file checked: a regular file owned
  by this user.
- ``make_private(path)``: a file provscope created or owns (an SQLite file) set to 0600.

Parents above the checked directory are not checked: ``/tmp`` is world-writable and
sticky by design, and a user's home is theirs to arrange.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from pathlib import Path

from provscope.errors import ProvscopeError

__all__ = ["UnsafePath", "make_private", "open_private", "private_dir", "private_sqlite",
           "trusted_socket",
           "verify_dir"]

DIR_MODE = 0o700
FILE_MODE = 0o600


class UnsafePath(ProvscopeError, OSError):
    """A directory or file provscope would use is not safe (owner, mode or a symlink)."""


def _uid() -> int:
    return os.geteuid()


def verify_dir(path: str | os.PathLike[str]) -> Path:
    """Check an existing directory: not a symlink, a directory, owned by this effective
    user, not writable by group or others. Returns the path.

    Raises:
        UnsafePath: one line naming the path, the problem and what to do.
        FileNotFoundError: the directory does not exist.
    """
    p = Path(path)
    st = os.lstat(p)
    if stat.S_ISLNK(st.st_mode):
        raise UnsafePath(f"{p} is a symbolic link; provscope keeps its state only in a real "
                         f"directory it owns (remove the link, or choose another path)")
    if not stat.S_ISDIR(st.st_mode):
        raise UnsafePath(f"{p} is not a directory; remove it or choose another path")
    if st.st_uid != _uid():
        raise UnsafePath(f"{p} belongs to uid {st.st_uid}, not to this user (uid {_uid()}); "
                         f"provscope refuses to use it (remove it, or choose another path)")
    if st.st_mode & 0o022:
        raise UnsafePath(f"{p} is writable by other users (mode {stat.S_IMODE(st.st_mode):04o});"
                         f" provscope needs it private: chmod 700 {p}, or choose another path")
    return p


def private_dir(path: str | os.PathLike[str]) -> Path:
    """``path`` as a verified private directory: created with mode 0700 when missing
    (missing parents are created with the default mode), else checked as it is.

    Raises:
        UnsafePath: the directory exists but is a symlink, not ours, or writable by others.
        OSError: it cannot be created.
    """
    p = Path(path)
    if not os.path.lexists(p):
        p.parent.mkdir(parents=True, exist_ok=True)
        # 0700 & ~umask can only drop bits: the directory is never more open than 0700.
        with contextlib.suppress(FileExistsError):
            os.mkdir(p, DIR_MODE)
    return verify_dir(p)


def open_private(path: str | os.PathLike[str], flags: int = os.O_RDWR | os.O_CREAT,
                 mode: int = FILE_MODE) -> int:
    """Open ``path`` without following a symlink and return the descriptor; a file this
    call creates gets exactly ``mode`` (0600), whatever the umask.

    Raises:
        UnsafePath: ``path`` is a symlink, not a regular file, or owned by another user.
        OSError: it cannot be opened.
    """
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    except OSError as exc:
        if exc.errno == errno.ELOOP or os.path.islink(path):  # ELOOP: the last component is a link
            raise UnsafePath(f"{path} is a symbolic link; provscope does not write through "
                             f"links (remove it)") from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UnsafePath(f"{path} is not a regular file; remove it")
        if st.st_uid != _uid():
            raise UnsafePath(f"{path} belongs to uid {st.st_uid}, not to this user (uid "
                             f"{_uid()}); provscope refuses to use it (remove it)")
        if stat.S_IMODE(st.st_mode) != mode:
            os.fchmod(fd, mode)
    except BaseException:
        os.close(fd)
        raise
    return fd


def make_private(path: str | os.PathLike[str]) -> None:
    """Set an existing file this user owns to 0600 (a no-op for files of other users or
    special files such as ``:memory:``). Never raises."""
    try:
        st = os.lstat(path)
        if (stat.S_ISREG(st.st_mode) and st.st_uid == _uid()
                and stat.S_IMODE(st.st_mode) != FILE_MODE):
            os.chmod(path, FILE_MODE)  # lstat said: a regular file, not a link
    except (OSError, NotImplementedError):
        pass


def trusted_socket(path: str | os.PathLike[str]) -> None:
    """Check a Unix socket before a job connects to it: a socket owned by this user (or
    root), in a directory owned by this user (or root) that others cannot write. A job
    never sends its records to a listener another user planted.

    Raises:
        UnsafePath: one line naming the path and the problem.
        FileNotFoundError: no socket there.
    """
    p = Path(path)
    ok = {_uid(), 0}
    st = os.lstat(p)
    if not stat.S_ISSOCK(st.st_mode):
        raise UnsafePath(f"{p} is not a socket; no agent is used")
    if st.st_uid not in ok:
        raise UnsafePath(f"{p} belongs to uid {st.st_uid}, not to this user; no agent is used")
    parent = os.lstat(p.parent)
    if stat.S_ISLNK(parent.st_mode) or parent.st_uid not in ok or parent.st_mode & 0o022:
        raise UnsafePath(f"{p.parent} is not a private directory of this user; the socket in "
                         f"it is not used")


def private_sqlite(path: str | os.PathLike[str]) -> None:
    """Before SQLite opens ``path`` to write: create the file owner-only (0600, no
    symlink followed) when missing, or set an existing file of ours to 0600. SQLite
    gives its ``-wal`` and ``-shm`` files the database file's mode, so they are
    owner-only too; existing ones of ours are set to 0600 here as well. Never raises
    for a file it cannot change (SQLite then reports what it cannot do)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(p, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     FILE_MODE)
    except FileExistsError:
        make_private(p)
    except OSError:
        return
    else:
        with contextlib.suppress(OSError):
            os.fchmod(fd, FILE_MODE)
        os.close(fd)
    for suffix in ("-wal", "-shm", "-journal"):
        make_private(f"{p}{suffix}")
