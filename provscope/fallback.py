"""A stand-in for an embedded store that cannot be written, moved back in later.

A job started in a read-only directory (or on a full disk) cannot create its embedded
SQLite file there. Waiting and retrying would hold the job at exit until the shutdown
deadline and then lose its records. Instead, before the first record is written,
:func:`redirect` probes the file's directory once; when it cannot be written, the job's
embedded store becomes a file of its own under the state directory
(``$XDG_STATE_HOME/provscope/fallback/<key>/provscope.db``, owner-only), labelled with the
path it stands in for, and one line says so. Time series and lineage both go there (the
lineage store follows the embedded file unless ``lineage.url`` names another).

:func:`merge_back` moves such files into the intended one: every provscope process that
opens a writable embedded store calls it, so the records arrive where they were meant to
as soon as that directory can be written; ``provscope spool status`` lists what waits.
Rows are copied table by table (``INSERT OR IGNORE``: a row copied twice is kept once)
and the stand-in is deleted after the copy is committed.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import sqlite3
from pathlib import Path
from typing import TYPE_CHECKING

from provscope.safefs import open_private, private_dir

if TYPE_CHECKING:
    from provscope.config import Config

__all__ = ["fallback_dir", "merge_back", "pending", "redirect", "unwritable"]

log = logging.getLogger("provscope.client")

_LABEL = "destination.json"
_DB = "provscope.db"


def _root() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or os.path.join("~", ".local", "state")
    return Path(base).expanduser() / "provscope" / "fallback"


def fallback_dir(intended: str) -> Path:
    """Where the stand-in for the embedded file ``intended`` (absolute) lives."""
    key = hashlib.sha256(intended.encode()).hexdigest()[:16]
    return _root() / key


def unwritable(path: str) -> str | None:
    """Why the SQLite file ``path`` cannot be written (``"read-only file system"``,
    ``"permission denied"``, ``"no space left on device"``), or None when it can. Creates
    the file's missing parent directories, writes and removes one small probe file;
    blocks only on that."""
    target = Path(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():
            fd = os.open(target, os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW)
            os.close(fd)
        probe = target.parent / f".{target.name}.{os.getpid()}.probe"
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            os.write(fd, b"\0" * 4096)
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as exc:
        if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOSPC, errno.EDQUOT):
            return os.strerror(exc.errno).lower()
        return None  # anything else is the store's to report when it writes
    return None


def redirect(config: Config) -> Config:
    """``config`` (paths already absolute) with ``embedded.path`` moved to its stand-in
    when the embedded file is in use and cannot be written; one warning line says where
    and why. Otherwise ``config`` itself, after moving earlier stand-ins back in."""
    uses_file = config.influxdb.url is None or config.lineage.url is None
    intended = config.embedded.path
    if not uses_file or intended == ":memory:":
        return config
    reason = unwritable(intended)
    if reason is None:
        merge_back(intended)
        return config
    try:
        where = private_dir(fallback_dir(intended))
        label = where / _LABEL
        if not label.exists():
            fd = open_private(label, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            try:
                os.write(fd, json.dumps({"intended": intended}).encode())
            finally:
                os.close(fd)
    except Exception as exc:  # no stand-in either: the store reports its own errors
        log.warning("provscope: cannot write %s (%s) and no fallback directory (%s)",
                    intended, reason, exc)
        return config
    stand_in = str(where / _DB)
    log.warning("provscope: cannot write %s (%s); records go to %s and are moved there "
                "by the next provscope process that can write it (read them meanwhile with "
                "`provscope --set embedded.path=%s runs`)", intended, reason, stand_in,
                stand_in)
    return config.model_copy(update={
        "embedded": config.embedded.model_copy(update={"path": stand_in})})


def pending() -> list[tuple[str, Path]]:
    """``(intended path, stand-in file)`` of every stand-in waiting to be moved back."""
    out: list[tuple[str, Path]] = []
    root = _root()
    if not root.is_dir():
        return out
    for label in sorted(root.glob(f"*/{_LABEL}")):
        try:
            intended = json.loads(label.read_text())["intended"]
        except Exception:
            continue
        db = label.parent / _DB
        if db.exists():
            out.append((str(intended), db))
    return out


def merge_back(intended: str) -> int:
    """Copy the rows of ``intended``'s stand-in into ``intended`` and delete the stand-in.
    Returns the rows copied (0 when there is none). Never raises: a failed move leaves
    the stand-in for the next try and says so in one line."""
    where = fallback_dir(intended)
    source = where / _DB
    if not source.exists():
        return 0
    try:
        copied = _copy_rows(source, Path(intended))
    except Exception as exc:
        log.warning("provscope: records written to %s while %s could not be written are "
                    "not moved yet (%s: %s)", source, intended, type(exc).__name__, exc)
        return 0
    shutil.rmtree(where, ignore_errors=True)
    log.warning("provscope: moved %d rows written to %s while %s could not be written "
                "into it", copied, source, intended)
    return copied


def _copy_rows(source: Path, target: Path) -> int:
    from provscope.safefs import private_sqlite

    private_sqlite(target)
    conn = sqlite3.connect(str(target), timeout=10, isolation_level=None)
    try:
        conn.execute("ATTACH DATABASE ? AS standin", (str(source),))
        objects = conn.execute(
            "SELECT type, name, sql FROM standin.sqlite_master WHERE sql IS NOT NULL "
            "AND name NOT LIKE 'sqlite_%' ORDER BY type = 'index'").fetchall()
        have = {name for (name,) in conn.execute(
            "SELECT name FROM main.sqlite_master")}
        copied = 0
        conn.execute("BEGIN IMMEDIATE")
        try:
            for _kind, name, sql in objects:
                if name not in have:
                    conn.execute(sql)  # the same provscope wrote both: the same DDL
            for kind, name, _ in objects:
                if kind != "table":
                    continue
                quoted = '"' + name.replace('"', '""') + '"'
                cur = conn.execute(
                    f"INSERT OR IGNORE INTO main.{quoted} SELECT * FROM standin.{quoted}")
                copied += max(cur.rowcount, 0)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("DETACH DATABASE standin")
        return copied
    finally:
        conn.close()
