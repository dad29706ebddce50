"""Exceptions raised by provscope.

The tree::

    ProvscopeError
    ├── ConfigError            bad configuration: one line naming key, value, what is allowed
    ├── CollectorUnavailable   a collector cannot open (no NVML, no permission, ...)
    ├── ExportError            an exporter cannot deliver (auth refused, schema too new, ...)
    │   └── AuthError          the server refused the credentials (401/403)
    └── LineageSchemaError     the lineage database has a newer schema than this release

None of these is ever raised into a training loop: the in-job API catches, counts and
logs. They surface in the CLI (exit code 2 for ``ConfigError``) and in explicit calls
such as ``Pipeline.from_config``.
"""

from __future__ import annotations

__all__ = [
    "AuthError",
    "CollectorUnavailable",
    "ConfigError",
    "ExportError",
    "LineageSchemaError",
    "ProvscopeError",
]


class ProvscopeError(Exception):
    """Base class of every error provscope raises on purpose."""


class ConfigError(ProvscopeError, ValueError):
    """A setting has a bad value or an unknown key.

    The message is one line: ``<key>: <value!r> is not allowed; <what is allowed>``.
    """


class CollectorUnavailable(ProvscopeError):
    """A collector cannot run on this machine (raised by ``Collector.open``)."""


class ExportError(ProvscopeError):
    """An exporter cannot deliver and retrying will not help."""


class AuthError(ExportError):
    """The server refused the credentials (HTTP 401 or 403)."""


class LineageSchemaError(ExportError):
    """The lineage database was written by a newer provscope (schema version too high)."""
