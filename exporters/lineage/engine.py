"""Lineage URLs and engines: which database a URL names and how to connect to it (JSON
columns are serialised by ``provscope.jsonsafe.dumps``).

The store is chosen by URL scheme (``sqlite:///path.db``, ``postgresql://user@host/db``)
through ``SCHEMES``; the PostgreSQL driver (psycopg 3) is imported only when such a URL is
used. ``safe_url`` renders a URL for logs and messages without its password.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Engine, make_url

from provscope.destinations import safe_url  # the one helper; re-exported here
from provscope.errors import ConfigError
from provscope.forking import reset_in_child
from provscope.jsonsafe import dumps as json_dumps  # the JSON columns' serialiser
from provscope.safefs import private_sqlite

__all__ = [
    "SCHEMES",
    "create_lineage_engine",
    "json_dumps",
    "normalize_url",
    "safe_url",
    "spool_key",
]


# ----------------------------------------------------------------------------- URLs / engines

def _sqlite_path(url: sa.URL) -> str | None:
    db = url.database
    return None if not db or db == ":memory:" else db


def _sqlite_engine(url: sa.URL, *, writer: bool, busy_timeout_ms: int) -> Engine:
    path = _sqlite_path(url)
    if writer and path:
        private_sqlite(Path(path).expanduser())  # 0600 file (and so WAL/SHM), parents created
    kwargs: dict[str, Any] = {
        "connect_args": {"check_same_thread": False, "timeout": busy_timeout_ms / 1000},
        "json_serializer": json_dumps,
    }
    if path is None:
        kwargs["poolclass"] = sa.pool.StaticPool  # one shared in-memory database
    engine = sa.create_engine(url, **kwargs)

    @sa.event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # We issue BEGIN ourselves (below); pysqlite's implicit transactions do not cover DDL.
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
        if not writer:
            # A reader never writes: not even the WAL header into an empty file that
            # `provscope runs` was pointed at.
            cur.execute("PRAGMA query_only = 1")
        elif path is not None:
            # WAL: the points writer, the lineage writer and readers share one file.
            cur.execute("PRAGMA journal_mode = WAL")
            cur.execute("PRAGMA synchronous = NORMAL")
        cur.close()

    @sa.event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        # Writers take the write lock at BEGIN: a deferred transaction that upgrades from
        # read to write gets SQLITE_BUSY at once instead of waiting on busy_timeout.
        conn.exec_driver_sql("BEGIN IMMEDIATE" if writer else "BEGIN")

    return engine


def _postgres_engine(url: sa.URL, *, writer: bool, busy_timeout_ms: int) -> Engine:
    if importlib.util.find_spec("psycopg") is None:
        raise ConfigError("lineage URL is PostgreSQL but psycopg is not installed; "
                          "pip install 'provscope[postgres]'")
    return sa.create_engine(
        url.set(drivername="postgresql+psycopg"),
        pool_pre_ping=True,  # a restarted server leaves dead pooled connections behind
        pool_size=2,
        max_overflow=2,
        connect_args={"connect_timeout": max(1, busy_timeout_ms // 1000)},
        json_serializer=json_dumps,
    )


#: URL scheme -> engine factory. ``postgresql://`` maps to the psycopg 3 driver.
SCHEMES: dict[str, Callable[..., Engine]] = {
    "sqlite": _sqlite_engine,
    "postgresql": _postgres_engine,
    "postgres": _postgres_engine,
    "postgresql+psycopg": _postgres_engine,
}


def normalize_url(url: str) -> sa.URL:
    """Parse a lineage URL and check its scheme.

    Raises:
        ConfigError: not a URL, or a scheme other than sqlite / postgresql.
    """
    try:
        parsed = make_url(url)
    except sa_exc.ArgumentError:
        raise ConfigError(f"lineage URL {url!r} is not a URL; use sqlite:///PATH.db or "
                          "postgresql://USER@HOST:PORT/DB") from None
    if parsed.drivername not in SCHEMES:
        raise ConfigError(f"lineage URL {url!r}: scheme {parsed.drivername!r} is not supported; "
                          "use sqlite:///PATH.db or postgresql://USER@HOST:PORT/DB")
    return parsed


def create_lineage_engine(url: str, *, writer: bool = True,
                          busy_timeout_ms: int = 2000) -> Engine:
    """A SQLAlchemy engine for a lineage URL (sqlite:///..., postgresql://...).

    Args:
        url: the lineage URL.
        writer: SQLite only: create the parent directory and take the write lock at BEGIN.
        busy_timeout_ms: how long a statement waits on a locked SQLite file, and the
            PostgreSQL connect timeout (rounded to seconds).

    Raises:
        ConfigError: unsupported scheme or missing driver.
    """
    parsed = normalize_url(url)
    engine = SCHEMES[parsed.drivername](parsed, writer=writer, busy_timeout_ms=busy_timeout_ms)
    reset_in_child(engine, _dispose_in_child)
    return engine


def _dispose_in_child(engine: Engine) -> None:
    # Pooled connections belong to the parent; the child opens its own.
    engine.dispose(close=False)



def spool_key(url: str) -> str:
    """The URL with a SQLite path made absolute (one database, one spool directory)."""
    try:
        parsed = make_url(url)
    except sa_exc.ArgumentError:
        return url
    path = _sqlite_path(parsed) if parsed.drivername == "sqlite" else None
    if path:
        return f"sqlite:///{Path(path).expanduser().resolve()}"
    return parsed.render_as_string(hide_password=True)
