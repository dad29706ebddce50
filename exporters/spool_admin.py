"""The spool as a visible, manageable queue: list, replay and drop spool directories.

Every exporter that spools writes into one directory per destination under the spool
root (``influxdb.spool_dir``, default ``$XDG_STATE_HOME/provscope/spool``):
``influxdb-<api>-<db>-<hash>[.N]`` for time series, ``lineage-<hash>[-N]`` for lineage,
each labelled with its destination (``destination.json``, no credentials). This module
is what ``provscope spool`` and the agent use:

- ``entries(root)``: one ``Entry`` per directory (kind, destination, pending batches and
  points/records, bytes, whether a live process holds it).
- ``replay(entry, config, url=None)``: send what it holds to the configured store (or to
  ``url``: points stranded under a mistyped port go where they belong); acknowledges each
  batch once written, counts batches the server rejects as dropped, stops at the first
  batch the destination cannot take now (it stays spooled).
- ``drop(entry)``: delete a directory no process holds; returns what was dropped.
- ``matches(entry, config)``: whether an entry is for a store this config writes to (the
  agent replays those by itself, ``Agent`` every ``_SWEEP_S``).
"""

from __future__ import annotations

import contextlib
import gzip
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from provscope.exporters.spool import Spool, SpoolBusy, read_label

from provscope.destinations import default_spool_dir, safe_url
from provscope.records import record_from_dict

if TYPE_CHECKING:
    from provscope.config import Config

__all__ = ["Entry", "Outcome", "drop", "entries", "matches", "replay", "spool_root"]


@dataclass
class Entry:
    """One spool directory."""

    path: Path
    kind: str  # "influxdb" | "lineage" | "unknown"
    destination: str  # URL without credentials, or "unknown"
    unit: str
    batches: int = 0
    items: int = 0  # points or lineage records
    bytes: int = 0
    busy: bool = False  # a live process holds it (it replays it itself)

    def as_dict(self) -> dict[str, Any]:
        return {"path": str(self.path), "kind": self.kind, "destination": self.destination,
                "unit": self.unit, "batches": self.batches, "items": self.items,
                "bytes": self.bytes, "busy": self.busy}


@dataclass
class Outcome:
    """What ``replay`` did."""

    replayed: int = 0  # points/records written
    dropped: int = 0  # refused by the destination, or unreadable on disk
    left: int = 0  # still spooled
    error: str | None = None  # why it stopped early
    extra: dict[str, Any] = field(default_factory=dict)


def spool_root(config: Config) -> Path:
    """The spool root of a configuration."""
    return Path(config.influxdb.spool_dir).expanduser() if config.influxdb.spool_dir \
        else default_spool_dir()


def _kind(path: Path, label: dict[str, str]) -> str:
    if label.get("kind") in ("influxdb", "lineage"):
        return label["kind"]
    return "influxdb" if path.name.startswith("influxdb-") else \
        "lineage" if path.name.startswith("lineage-") else "unknown"


def entries(root: str | Path) -> list[Entry]:
    """Every spool directory under ``root`` with what it holds. Never raises for one
    unreadable directory (it is listed with zero counts)."""
    root = Path(root)
    out: list[Entry] = []
    if not root.is_dir():
        return out
    for path in sorted(p for p in root.iterdir() if p.is_dir() and not p.is_symlink()):
        if not any(path.glob("*.seg")) and not (path / "lock").exists():
            continue
        label = read_label(path)
        kind = _kind(path, label)
        entry = Entry(path, kind, label.get("destination", "unknown"),
                      label.get("unit", "points" if kind == "influxdb" else "records"))
        try:
            with Spool(path) as spool:
                entry.batches = spool.pending_records
                entry.items = spool.pending_count
                entry.bytes = spool.pending_bytes
        except SpoolBusy:
            entry.busy = True
        except OSError:
            pass
        out.append(entry)
    return out


def matches(entry: Entry, config: Config) -> bool:
    """Whether ``entry`` holds data for a store ``config`` writes to."""
    if entry.kind == "influxdb":
        url = config.influxdb.url
        return url is not None and entry.destination == safe_url(url)
    if entry.kind == "lineage":
        from provscope.exporters.lineage.engine import spool_key

        return entry.destination == safe_url(spool_key(config.lineage_url))
    return False


def drop(entry: Entry) -> int:
    """Delete a spool directory no live process holds. Returns the points/records
    dropped.

    Raises:
        SpoolBusy: a live process holds it.
    """
    with Spool(entry.path) as spool:
        count = spool.pending_count
    shutil.rmtree(entry.path)
    return count


def replay(entry: Entry, config: Config, url: str | None = None) -> Outcome:
    """Send an entry's batches to ``url`` (default: the store ``config`` names for its
    kind), oldest first. Blocks for as long as the writes take.

    Raises:
        SpoolBusy: a live process holds it.
        ConfigError: no destination for this kind (``influxdb.url`` unset, ...).
    """
    with Spool(entry.path) as spool:
        if entry.kind == "influxdb":
            out = _replay_influxdb(spool, config, url)
        elif entry.kind == "lineage":
            out = _replay_lineage(spool, config, url)
        else:
            from provscope.errors import ConfigError

            raise ConfigError(f"{entry.path}: not a provscope spool directory")
        out.left = spool.pending_count
    return out


def _replay_influxdb(spool: Spool, config: Config, url: str | None) -> Outcome:
    from provscope.exporters.influxdb.transport import InfluxTransport, TransportError

    from provscope.errors import ConfigError

    c = config.influxdb
    target = url or c.url
    if not target:
        raise ConfigError("influxdb.url is not set; give the destination with --influx-url "
                          "URL or --set influxdb.url=URL")
    transport = InfluxTransport(
        target, api=c.api, database=c.database, retention_policy=c.retention_policy,
        username=c.username, password=c.secret("password"), org=c.org, bucket=c.bucket,
        token=c.secret("token"), gzip=c.gzip, timeout_s=c.timeout_s,
        tls_verify=c.tls_verify, tls_ca_file=c.tls_ca_file)
    out = Outcome()
    try:
        if c.api == "v1" and c.create_database:
            with contextlib.suppress(TransportError):  # the write below says what is wrong
                transport.create_database()
        while (item := spool.peek()) is not None:
            body, count = item
            raw = gzip.decompress(body) if body[:2] == b"\x1f\x8b" else body
            try:
                status, _, answer = transport.write(transport.compress(raw))
            except TransportError as exc:
                out.error = f"{safe_url(target)} unreachable ({exc})"
                break
            if 200 <= status < 300:
                out.replayed += count
            elif status in (400, 422) or status == 413:
                out.dropped += count  # the server refuses these points for good
            else:
                out.error = (f"{safe_url(target)} answered HTTP {status} "
                             f"{answer[:120].decode('utf-8', 'replace').strip()}")
                break
            spool.ack()
    finally:
        transport.close()
    return out


def _replay_lineage(spool: Spool, config: Config, url: str | None) -> Outcome:
    from provscope.exporters.lineage.store import SqlLineageStore

    store = SqlLineageStore(url or config.lineage_url)
    out = Outcome()
    try:
        while (item := spool.peek()) is not None:
            payload, count = item
            try:
                records = [record_from_dict(d) for d in json.loads(payload)]
            except (ValueError, TypeError, AttributeError):
                out.dropped += count  # damaged on disk
                spool.ack()
                continue
            try:
                store.write(records)
            except Exception as exc:  # the database is away or refuses: it stays spooled
                out.error = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                break
            out.replayed += count
            spool.ack()
    finally:
        store.close()
    return out
