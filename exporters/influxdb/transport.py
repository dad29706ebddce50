"""How the InfluxDB writer talks HTTP: endpoints per API, auth, one keep-alive connection.

The three write APIs (``influxdb.api``):

- ``v1``: ``POST /write?db=&rp=&u=&p=&precision=ns`` (InfluxDB 1.x, and the 1.x
  compatibility endpoint of 2.x/3.x); ``CREATE DATABASE`` goes to ``POST /query``.
- ``v2``: ``POST /api/v2/write?org=&bucket=&precision=ns`` with ``Authorization: Token``.
- ``v3``: ``POST /api/v3/write_lp?db=&precision=nanosecond`` with ``Authorization: Bearer``.

One persistent (keep-alive) ``http.client`` connection: the pipeline calls an exporter
from one worker thread only, so a pool would buy nothing, and the standard library keeps
provscope free of an HTTP dependency. Bodies are gzip'ed (level 1: most of the size win
for a fraction of the CPU). What an answer means is the writer's business
(``provscope.exporters.influxdb.writer``); this module only moves bytes.
"""

from __future__ import annotations

import contextlib
import gzip
import http.client
import json
import logging
import socket
import ssl
import urllib.parse

from provscope.destinations import safe_url
from provscope.errors import ConfigError

__all__ = ["API_VERSIONS", "InfluxTransport", "Response", "TransportError", "error_text"]

API_VERSIONS = ("v1", "v2", "v3")

log = logging.getLogger("provscope.exporters.influxdb")

# status, headers, body
Response = tuple[int, http.client.HTTPMessage, bytes]


class TransportError(Exception):
    """No answer: the connection could not be made, broke, or timed out."""

    def __init__(self, reason: str, *, refused: bool = False) -> None:
        super().__init__(reason)
        self.refused = refused


class InfluxTransport:
    """Endpoints, headers and the connection of one InfluxDB destination.

    Args:
        url: base URL, ``http://host:8086`` (``https`` works too; a path prefix is kept).
        api: ``"v1"``, ``"v2"`` or ``"v3"``.
        database: v1/v3 database; v2 bucket when ``bucket`` is unset.
        retention_policy: v1 retention policy (None: the database default).
        username, password: v1 credentials (sent as ``u``/``p``).
        org, bucket, token: v2 organisation and bucket; v2/v3 token (v1: sent as a
            ``Token`` header when no username is set, for 2.x's compatibility API).
        gzip: compress request bodies.
        timeout_s: connect and read timeout per request, seconds.

    Raises:
        ConfigError: an unusable URL or api.
    """

    def __init__(self, url: str, *, api: str, database: str, retention_policy: str | None,
                 username: str | None, password: str | None, org: str | None,
                 bucket: str | None, token: str | None, gzip: bool, timeout_s: float,
                 tls_verify: bool = True, tls_ca_file: str | None = None) -> None:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(f"influxdb.url: {safe_url(url)!r} is not an http:// or https:// "
                              "URL (e.g. http://127.0.0.1:8086)")
        if parts.username and not username:  # http://user:pw@host: the v1 credentials
            username = urllib.parse.unquote(parts.username)
            password = urllib.parse.unquote(parts.password or "") or password
        self._tls: ssl.SSLContext | None = None
        if parts.scheme == "https":
            # Verified by default (certificate and host name); influxdb.tls_verify: false is
            # the one switch, for a test server with a self-signed certificate.
            self._tls = ssl.create_default_context(cafile=tls_ca_file)
            if not tls_verify:
                self._tls.check_hostname = False
                self._tls.verify_mode = ssl.CERT_NONE
                log.warning("influxdb: TLS certificate verification is off "
                            "(influxdb.tls_verify: false) for %s", safe_url(url))
        if api not in API_VERSIONS:
            raise ConfigError(f"influxdb.api: {api!r} is not one of v1, v2, v3")
        self.url = url
        self.api = api
        self._https = parts.scheme == "https"
        self._host = parts.hostname
        self._port = parts.port or (443 if self._https else 80)
        self._timeout = timeout_s
        self._gzip = gzip
        self._database = database
        self._username = username
        self._password = password
        self._base = parts.path.rstrip("/")
        self.headers = {"Content-Type": "text/plain; charset=utf-8"}
        if gzip:
            self.headers["Content-Encoding"] = "gzip"
        q: dict[str, str]
        if api == "v1":
            q = {"db": database, "precision": "ns"}
            if retention_policy:
                q["rp"] = retention_policy
            if username:
                q["u"], q["p"] = username, password or ""
            elif token:
                self.headers["Authorization"] = f"Token {token}"
            self.write_path = f"{self._base}/write?{urllib.parse.urlencode(q)}"
            self.destination = database
        elif api == "v2":
            q = {"bucket": bucket or database, "precision": "ns"}
            if org:
                q["org"] = org
            if token:
                self.headers["Authorization"] = f"Token {token}"
            self.write_path = f"{self._base}/api/v2/write?{urllib.parse.urlencode(q)}"
            self.destination = bucket or database
        else:
            q = {"db": database, "precision": "nanosecond"}
            if token:
                self.headers["Authorization"] = f"Bearer {token}"
            self.write_path = f"{self._base}/api/v3/write_lp?{urllib.parse.urlencode(q)}"
            self.destination = database
        self.conn: http.client.HTTPConnection | None = None
        self.refused = False  # the last connection attempt was refused or timed out

    # ------------------------------------------------------------------ bodies

    def compress(self, raw: bytes) -> bytes:
        """The request body for ``raw`` line protocol (gzip'ed when enabled)."""
        return gzip.compress(raw, compresslevel=1, mtime=0) if self._gzip else raw

    def decompress(self, body: bytes) -> bytes:
        """The line protocol inside a body made by ``compress``."""
        return gzip.decompress(body) if self._gzip else body

    # ------------------------------------------------------------------ requests

    def write(self, body: bytes) -> Response:
        """POST one body to the write endpoint and read the answer. Blocks up to the timeout.

        Raises:
            TransportError: no answer.
        """
        return self.request("POST", self.write_path, body, self.headers)

    def send_write(self, body: bytes) -> None:
        """POST one body without reading the answer (``read_answer`` reads it), so the
        caller can encode the next body while the server works on this one.

        Raises:
            TransportError: the request could not be sent.
        """
        try:
            conn = self.conn or self._connect()
            conn.request("POST", self.write_path, body=body, headers=self.headers)
        except (http.client.HTTPException, OSError) as exc:
            self.close()
            raise TransportError(f"{type(exc).__name__}: {exc}") from None

    def read_answer(self) -> Response:
        """The answer to the request ``send_write`` sent.

        Raises:
            TransportError: no answer.
        """
        conn = self.conn
        if conn is None:
            raise TransportError("connection closed")
        try:
            resp = conn.getresponse()
            data = resp.read()
        except (http.client.HTTPException, OSError) as exc:
            self.close()
            raise TransportError(f"{type(exc).__name__}: {exc}") from None
        if resp.will_close:
            self.close()
        return resp.status, resp.headers, data

    def create_database(self) -> tuple[int, bytes]:
        """v1: ``CREATE DATABASE`` (idempotent on the server). Returns status and body.

        Raises:
            TransportError: no answer.
        """
        q = {"q": f'CREATE DATABASE "{_influxql_ident(self._database)}"'}
        if self._username:
            q["u"], q["p"] = self._username, self._password or ""
        headers = {"Content-Type": "application/x-www-form-urlencoded"}
        if "Authorization" in self.headers:
            headers["Authorization"] = self.headers["Authorization"]
        status, _, data = self.request("POST", f"{self._base}/query",
                                       urllib.parse.urlencode(q).encode(), headers)
        return status, data

    def request(self, method: str, path: str, body: bytes,
                headers: dict[str, str]) -> Response:
        """One request on the kept-alive connection (opened on demand); the whole answer
        is read so the connection can carry the next request.

        Raises:
            TransportError: no answer.
        """
        for attempt in (0, 1):
            reused = self.conn is not None
            conn = self.conn or self._connect()
            try:
                conn.request(method, path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
            except (http.client.HTTPException, OSError) as exc:
                self.close()
                # A kept-alive connection the server closed meanwhile: one fresh try.
                if reused and attempt == 0 and isinstance(
                        exc, (http.client.RemoteDisconnected, ConnectionResetError,
                              BrokenPipeError, http.client.BadStatusLine)):
                    continue
                raise TransportError(f"{type(exc).__name__}: {exc}") from None
            if resp.will_close:
                self.close()
            return resp.status, resp.headers, data
        raise TransportError("connection lost")  # pragma: no cover - the loop always returns

    # ------------------------------------------------------------------ connection

    def _connect(self) -> http.client.HTTPConnection:
        conn: http.client.HTTPConnection
        if self._https:
            conn = http.client.HTTPSConnection(self._host, self._port, timeout=self._timeout,
                                               context=self._tls)
        else:
            conn = http.client.HTTPConnection(self._host, self._port, timeout=self._timeout)
        try:
            conn.connect()
            # Small bodies must not wait for Nagle's delayed ACK (40 ms per request).
            conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError as exc:
            conn.close()
            self.refused = True
            raise TransportError(f"cannot connect: {exc}", refused=True) from None
        self.refused = False
        self.conn = conn
        return conn

    def close(self) -> None:
        """Close the connection (the next request opens a new one)."""
        if self.conn is not None:
            with contextlib.suppress(Exception):
                self.conn.close()
            self.conn = None

    def forget(self) -> None:
        """In a forked child: drop the parent's connection without closing its socket."""
        self.conn = None


def error_text(data: bytes) -> str:
    """The server's error message: the ``error``/``message`` of a JSON body, else the text."""
    text = data.decode("utf-8", errors="replace").strip()
    with contextlib.suppress(ValueError, AttributeError):
        obj = json.loads(text)
        text = str(obj.get("error") or obj.get("message") or text)
    return text


def _influxql_ident(name: str) -> str:
    return name.replace("\\", "\\\\").replace('"', '\\"')
