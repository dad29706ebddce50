"""Where records go, in words a person can check: URLs without credentials, absolute paths.

- ``safe_url(url)``: a URL without its user name, password or secret query parameters,
  for logs, status and messages (the one helper for that).
- ``absolute_paths(config, base)``: the config with every relative path (embedded file,
  SQLite lineage URL, spool directory, socket, watched directories) anchored to ``base``.
  The node agent anchors them to the directory it was started in, before ``--detach``
  changes directory to ``/``.
- ``destinations(config)``: the stores a configuration writes to, as display strings.
- ``names_destination(config)``: whether a configuration names a store of its own
  (``DESTINATION_KEYS`` differ from their defaults); such a job keeps its records out of
  a listening agent (``client.destination: auto``).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import parse_qsl, urlencode

if TYPE_CHECKING:
    from provscope.config import Config

__all__ = [
    "DESTINATION_KEYS",
    "absolute_paths",
    "default_spool_dir",
    "describe",
    "destinations",
    "names_destination",
    "safe_url",
]

#: Settings that name where records go. A job whose config sets any of them to something
#: other than its default writes to its own stores even when an agent listens.
DESTINATION_KEYS = ("influxdb.url", "lineage.url", "embedded.path")

# Query parameters that carry secrets in database and HTTP URLs.
_SECRET_PARAMS = frozenset({"password", "passwd", "pwd", "p", "token", "sslpassword",
                            "access_token", "api_key", "apikey", "secret"})
_SQLITE = re.compile(r"^(sqlite(?:\+\w+)?)://(/?)([^?]*)(\?.*)?$")


def safe_url(url: str) -> str:
    """``url`` without user name, password or secret query parameters (``token=``...).

    ``postgresql://user:pw@db:5432/lineage?sslmode=require`` becomes
    ``postgresql://db:5432/lineage?sslmode=require``. Never raises; text that is not a
    URL comes back with anything before an ``@`` removed.
    """
    try:
        m = re.match(r"^([A-Za-z][\w+.-]*://)([^/?#]*)(.*)$", url, re.S)
        if m is None:
            return re.sub(r"^[^@/]*@", "", url)
        head, netloc, rest = m.groups()
        netloc = netloc.rpartition("@")[2]
        path, sep, query = rest.partition("?")
        if sep:
            query, hash_, fragment = query.partition("#")
            kept = [(k, v) for k, v in parse_qsl(query, keep_blank_values=True)
                    if k.lower() not in _SECRET_PARAMS]
            rest = path + ("?" + urlencode(kept) if kept else "") + hash_ + fragment
        return head + netloc + rest
    except Exception:
        return "<url>"


def _anchor(path: str, base: Path) -> str:
    p = Path(path).expanduser()
    return str(p if p.is_absolute() else base / p)


def _sqlite_path(url: str) -> str | None:
    """The file path of a SQLite URL (as written), None for other URLs or memory."""
    m = _SQLITE.match(url)
    if m is None:
        return None
    path = m.group(3)
    if not m.group(2) or not path or path == ":memory:":
        return None  # sqlite:// and sqlite:///:memory: are in memory
    return path


def _anchor_sqlite_url(url: str, base: Path) -> str:
    m = _SQLITE.match(url)
    path = _sqlite_path(url)
    if m is None or path is None:
        return url
    # sqlite:///rel.db -> path "rel.db"; sqlite:////abs.db -> path "/abs.db"
    return f"{m.group(1)}:///{_anchor(path, base)}{m.group(4) or ''}"


def absolute_paths(config: Config, base: str | os.PathLike[str] | None = None) -> Config:
    """``config`` with every relative path anchored to ``base`` (default: the current
    directory) and ``~`` expanded. Absolute paths and server URLs are left as they are."""
    root = Path(base if base is not None else os.getcwd()).expanduser()
    update: dict[str, object] = {
        "embedded": config.embedded.model_copy(
            update={"path": _anchor(config.embedded.path, root)}),
    }
    if config.influxdb.spool_dir:
        update["influxdb"] = config.influxdb.model_copy(
            update={"spool_dir": _anchor(config.influxdb.spool_dir, root)})
    if config.lineage.url:
        update["lineage"] = config.lineage.model_copy(
            update={"url": _anchor_sqlite_url(config.lineage.url, root)})
    agent = config.agent
    fs = agent.collectors.filesystem
    collectors = agent.collectors.model_copy(update={"filesystem": fs.model_copy(
        update={"paths": tuple(_anchor(p, root) for p in fs.paths)})})
    agent_update: dict[str, object] = {"collectors": collectors}
    if agent.socket_path:
        agent_update["socket_path"] = _anchor(agent.socket_path, root)
    update["agent"] = agent.model_copy(update=agent_update)
    return config.model_copy(update=update)


def default_spool_dir() -> Path:
    """``$XDG_STATE_HOME/provscope/spool``, or ``~/.local/state/provscope/spool``."""
    base = os.environ.get("XDG_STATE_HOME") or os.path.join("~", ".local", "state")
    return Path(base).expanduser() / "provscope" / "spool"


def destinations(config: Config) -> dict[str, str]:
    """Where ``config`` sends records, for people: ``time_series``, ``lineage`` and
    ``spool`` (where batches wait while a server is away). URLs carry no credentials;
    paths are absolute (relative ones anchored to the current directory)."""
    cfg = absolute_paths(config)
    influx = cfg.influxdb
    if influx.url:
        where = (f"bucket {influx.bucket or influx.database}" if influx.api == "v2"
                 else f"database {influx.database}")
        points = f"InfluxDB {safe_url(influx.url.rstrip('/'))} ({influx.api}, {where})"
    else:
        points = f"SQLite {cfg.embedded.path}"
    url = cfg.lineage.url
    if url is None:
        lineage = f"SQLite {cfg.embedded.path}"
    else:
        path = _sqlite_path(url)
        lineage = f"SQLite {path}" if path else safe_url(url)
    spool = influx.spool_dir or str(default_spool_dir())
    return {"time_series": points, "lineage": lineage, "spool": spool}


def describe(where: dict[str, str]) -> str:
    """One line: ``time series -> ...; lineage -> ...; spool ...``."""
    parts = [f"time series -> {where.get('time_series', '?')}",
             f"lineage -> {where.get('lineage', '?')}"]
    if where.get("spool"):
        parts.append(f"spool {where['spool']}")
    if where.get("metrics"):
        parts.append(f"metrics {where['metrics']}")
    return "; ".join(parts)


def names_destination(config: Config) -> bool:
    """True when ``config`` names a store of its own: any of ``DESTINATION_KEYS`` differs
    from its default, whatever set it (``settings=``, YAML, ``PROVSCOPE_*``)."""
    from provscope.config import Config

    default = Config()
    for key in DESTINATION_KEYS:
        section, name = key.split(".")
        if getattr(getattr(config, section), name) != getattr(getattr(default, section), name):
            return True
    return False
