"""Time series from InfluxDB: InfluxQL over HTTP ``/query``, every value a bound
parameter (``params``), identifiers quoted and escaped.

The fast path, hand-written because the response is the cost: ``epoch=ns`` integer
times, a chunked JSON response read whole and parsed chunk by chunk with orjson (a C
parser, already a dependency), then each series' rows turned into numpy columns at once
(``np.array(values, dtype=object)`` and one cast per column), instead of a Python loop
over every value."""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import orjson

from provscope.errors import ProvscopeError
from provscope.query._columns import Columns, concat

if TYPE_CHECKING:
    from provscope.config import Config

CHUNK_SIZE = 50_000


def ident(name: str) -> str:
    """An InfluxQL identifier: double-quoted, ``\\`` and ``"`` escaped."""
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'


def literal(value: str) -> str:
    """An InfluxQL string literal: single-quoted, ``\\`` and ``'`` escaped (used only for
    the names InfluxQL cannot take as parameters, e.g. ``SHOW ... ON``)."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def influxql(measurement: str, fields: Sequence[str] | None,
             filters: Mapping[str, Sequence[str]], lo: int | None,
             hi: int | None) -> tuple[str, dict[str, Any]]:
    """The statement and its bound parameters (tags come back through ``GROUP BY *``)."""
    params: dict[str, Any] = {}
    where: list[str] = []
    for key, values in filters.items():
        alts = []
        for value in values:
            name = f"p{len(params)}"
            params[name] = value
            alts.append(f"{ident(key)} = ${name}")
        where.append("(" + " OR ".join(alts) + ")" if len(alts) > 1 else alts[0])
    if lo is not None:
        params["lo"] = int(lo)
        where.append("time >= $lo")
    if hi is not None:
        params["hi"] = int(hi)
        where.append("time <= $hi")
    select = ", ".join(ident(f) for f in fields) if fields else "*"
    q = f"SELECT {select} FROM {ident(measurement)}"
    if where:
        q += " WHERE " + " AND ".join(where)
    return q + " GROUP BY *", params


def database(config: Config) -> str:
    ic = config.influxdb
    return (ic.bucket or ic.database) if ic.api == "v2" else ic.database


def request(config: Config, statement: str, params: Mapping[str, Any],
            chunked: bool = True) -> bytes:
    """POST one statement to ``/query``; the raw (chunked) JSON body. Blocks up to
    ``influxdb.timeout_s`` per read.

    Raises:
        ProvscopeError: unreachable, or an HTTP error (one line, no credentials).
    """
    ic = config.influxdb
    url = ic.url or ""
    form = {"db": database(config), "q": statement, "epoch": "ns"}
    if params:
        form["params"] = json.dumps(dict(params))
    if chunked:
        form.update({"chunked": "true", "chunk_size": str(CHUNK_SIZE)})
    if ic.retention_policy:
        form["rp"] = ic.retention_policy
    parts = urllib.parse.urlsplit(url)
    username, password = ic.username, ic.secret("password")
    if parts.username and not username:  # http://user:pw@host, as the writer reads it
        username = urllib.parse.unquote(parts.username)
        password = urllib.parse.unquote(parts.password or "") or password
    if username:
        form["u"] = username
        form["p"] = password or ""
    headers = {"Accept": "application/json"}
    token = ic.secret("token")
    if token:
        headers["Authorization"] = f"Token {token}"
    # No credentials in the request URL, nor in any message naming it.
    url = urllib.parse.urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))
    url = url.rstrip("/") + "/query"
    req = urllib.request.Request(url, data=urllib.parse.urlencode(form).encode(),
                                 headers=headers, method="POST")
    tls = None
    if parts.scheme == "https":  # verified unless influxdb.tls_verify: false
        import ssl

        tls = ssl.create_default_context(cafile=ic.tls_ca_file)
        if not ic.tls_verify:
            tls.check_hostname, tls.verify_mode = False, ssl.CERT_NONE
    try:
        with urllib.request.urlopen(req, timeout=ic.timeout_s, context=tls) as resp:
            return resp.read()
    except urllib.error.HTTPError as exc:
        detail = " ".join(exc.read().decode("utf-8", "replace").split())[:200]
        raise ProvscopeError(f"InfluxDB query at {url} failed: HTTP {exc.code} {detail}") \
            from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ProvscopeError(f"InfluxDB at {url} is unreachable: {reason}") from None


def series_of(body: bytes) -> Iterator[dict[str, Any]]:
    """Each series object of a (chunked) response, in order.

    Raises:
        ProvscopeError: the response carries an error.
    """
    for line in body.splitlines():
        if not line.strip():
            continue
        chunk = orjson.loads(line)
        if chunk.get("error"):
            raise ProvscopeError(f"InfluxDB query failed: {chunk['error']}")
        for result in chunk.get("results", []):
            if result.get("error"):
                raise ProvscopeError(f"InfluxDB query failed: {result['error']}")
            yield from result.get("series", [])


def _column(values: np.ndarray) -> np.ndarray:
    """One field's values: float64 (None -> NaN, booleans 0/1, as the embedded store
    keeps them), or an object array of str/None for a string field."""
    try:
        return values.astype(np.float64)
    except (TypeError, ValueError):
        return np.array([v if isinstance(v, str) or v is None else str(v) for v in values],
                        dtype=object)


def read(config: Config, measurement: str, fields: Sequence[str] | None,
         filters: Mapping[str, Sequence[str]], lo: int | None, hi: int | None) -> Columns:
    """Rows of ``measurement`` as ``Columns``. Blocks on InfluxDB."""
    statement, params = influxql(measurement, fields, filters, lo, hi)
    blocks: list[Columns] = []
    for s in series_of(request(config, statement, params)):
        values = s.get("values") or []
        if not values:
            continue
        tags = {k: str(v) for k, v in (s.get("tags") or {}).items() if v not in (None, "")}
        grid = np.array(values, dtype=object)
        if grid.ndim != 2:  # ragged rows: never sent by InfluxDB, but keep it safe
            width = max(len(r) for r in values)
            grid = np.array([list(r) + [None] * (width - len(r)) for r in values],
                            dtype=object)
        columns = s["columns"]
        out = {name: _column(grid[:, j]) for j, name in enumerate(columns) if j}
        # A row whose selected fields are all null: InfluxDB never sends one.
        blocks.append(Columns(grid[:, 0].astype(np.int64), np.zeros(len(grid), np.int64),
                              [tags], out))
    return concat(blocks)


def retention(config: Config) -> tuple[str, int] | None:
    """(name, duration ns) of the retention policy reads use; None: unknown or infinite."""
    try:
        body = request(config, f"SHOW RETENTION POLICIES ON {ident(database(config))}", {},
                       chunked=False)
        for s in series_of(body):
            cols = s["columns"]
            for row in s.get("values") or []:
                rec = dict(zip(cols, row, strict=False))
                if (config.influxdb.retention_policy or "") in ("", rec.get("name")) and (
                        config.influxdb.retention_policy or rec.get("default")):
                    ns = _duration_ns(str(rec.get("duration", "0s")))
                    return (str(rec.get("name")), ns) if ns else None
    except ProvscopeError:
        return None
    return None


def _duration_ns(text: str) -> int:
    """``168h0m0s`` -> ns (``0s``: infinite, 0)."""
    import re

    units = {"h": 3600, "m": 60, "s": 1}
    return int(sum(float(n) * units[u] for n, u in re.findall(r"([\d.]+)([hms])", text))
               * 1e9)
