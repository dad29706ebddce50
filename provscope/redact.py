"""Secrets never leave provscope: one rule for what looks secret, one mask, one log filter.

The rule (documented in docs/security.md, configurable with ``redact.names``): a name
(a command-line option such as ``--api-token``, the key of a ``KEY=VALUE`` pair, a key of
task params or of a run's config) is secret when, lower-cased and split into words at
``-``, ``_``, ``.`` and other non-alphanumerics, its LAST word is one of ``names``
(``token``, ``password``, ``secret``, ``key``, ...) or ends with one of the long ones
(``password``, ``passwd``, ``token``, ``secret``, ``apikey``, ``passphrase``), so that
``PGPASSWORD`` and ``hftoken`` count while ``--max-tokens``, ``--key-file`` and
``monkey`` do not. Its value is replaced by ``MASK``.

- ``mask_argv(argv)``: ``--api-token X``, ``--password=X``, ``-p``-less forms and
  ``TOKEN=X`` words masked.
- ``mask_mapping(obj)``: values under secret-looking keys masked, recursively.
- ``mask_url(url)``: a URL's password (and secret query parameters) masked, user kept.
- ``remember(value)`` / ``redact(text)``: secret values provscope knows (passwords,
  tokens, files' contents from the config) and URL credentials cut out of any text.
- ``install_log_filter()``: every log record of a ``provscope*`` logger goes through
  ``redact`` (installed once per process, when the configuration is loaded).
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

__all__ = [
    "DEFAULT_NAMES",
    "MASK",
    "install_log_filter",
    "is_secret_name",
    "mask_argv",
    "mask_mapping",
    "mask_url",
    "redact",
    "remember",
]

MASK = "***"

#: Last words of a secret-looking name (``redact.names``'s default).
DEFAULT_NAMES: tuple[str, ...] = (
    "password", "passwd", "pwd", "pass", "passphrase", "secret", "token", "key", "apikey",
    "credential", "credentials", "auth", "authorization", "cookie", "dsn",
)
# A name that ENDS with one of these counts even without a separator (PGPASSWORD).
_SUFFIXES = ("password", "passwd", "passphrase", "secret", "token", "apikey")
_WORD = re.compile(r"[^a-z0-9]+")
_MIN_SECRET = 4  # shorter remembered values would mask ordinary text


def is_secret_name(name: str, names: Iterable[str] = DEFAULT_NAMES) -> bool:
    """Whether ``name`` (an option, a variable, a key) looks like it holds a secret."""
    words = [w for w in _WORD.split(name.lower()) if w]
    if not words:
        return False
    last = words[-1]
    names = tuple(n.lower() for n in names)
    return last in names or any(last.endswith(s) for s in _SUFFIXES if s in names)


def mask_argv(argv: Sequence[str], names: Iterable[str] = DEFAULT_NAMES) -> list[str]:
    """``argv`` with the values of secret-looking options and ``KEY=VALUE`` words masked.

    ``--api-token X`` -> ``--api-token ***``; ``--password=X`` -> ``--password=***``;
    ``HF_TOKEN=X`` -> ``HF_TOKEN=***``; URLs with a password keep everything else.
    """
    names = tuple(names)
    out: list[str] = []
    mask_next = False
    for arg in argv:
        arg = str(arg)
        if mask_next:
            mask_next = False
            if not arg.startswith("-") or _is_number(arg):
                out.append(MASK)
                continue
        if arg.startswith("-") and not _is_number(arg):
            opt, eq, _ = arg.partition("=")
            if is_secret_name(opt, names):
                if eq:
                    out.append(f"{opt}={MASK}")
                else:
                    out.append(arg)
                    mask_next = True
                continue
        else:
            key, eq, _ = arg.partition("=")
            if eq and key and re.fullmatch(r"[A-Za-z_][\w.-]*", key) and is_secret_name(key, names):
                out.append(f"{key}={MASK}")
                continue
        out.append(mask_url(arg) if "://" in arg else arg)
    return out


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def mask_mapping(obj: Any, names: Iterable[str] = DEFAULT_NAMES) -> Any:
    """A copy of ``obj`` (dicts, lists, tuples nested) with the values under
    secret-looking keys replaced by ``MASK`` and URL passwords masked. Other values are
    returned as they are (not copied)."""
    names = tuple(names)
    if isinstance(obj, Mapping):
        return {k: (MASK if isinstance(k, str) and is_secret_name(k, names)
                    and obj[k] is not None else mask_mapping(obj[k], names))
                for k in obj}
    if isinstance(obj, list | tuple):
        masked = [mask_mapping(v, names) for v in obj]
        if all(a is b for a, b in zip(masked, obj, strict=True)):
            return obj
        return masked if isinstance(obj, list) else tuple(masked)
    if isinstance(obj, str) and "://" in obj:
        return mask_url(obj)
    return obj


_URL_CRED = re.compile(r"(?P<head>\b[A-Za-z][\w+.-]*://)(?P<user>[^/?#@\s:]*):(?P<pw>[^/?#@\s]*)@")
_SECRET_QUERY = re.compile(
    r"(?P<k>(?:^|[?&\s;,(])(?:password|passwd|pwd|p|token|sslpassword|access_token|api_key|"
    r"apikey|secret)=)"
    r"(?P<v>[^&#\s]*)", re.I)
_AUTH_HEADER = re.compile(r"(?P<k>\b(?:Token|Bearer|Basic)\s+)(?P<v>[A-Za-z0-9._~+/=-]{8,})")


def mask_url(url: str) -> str:
    """``scheme://user:pw@host/...?token=T`` -> ``scheme://user:***@host/...?token=***``.
    Never raises."""
    out = _URL_CRED.sub(lambda m: f"{m['head']}{m['user']}:{MASK}@", url)
    return _SECRET_QUERY.sub(lambda m: f"{m['k']}{MASK}", out)


_known: set[str] = set()
_known_lock = threading.Lock()
_known_re: re.Pattern[str] | None = None


def remember(*values: Any) -> None:
    """Remember secret values (passwords, tokens) so that ``redact`` cuts them out of
    any text, log lines included. Values shorter than 4 characters are ignored."""
    global _known_re
    with _known_lock:
        added = False
        for v in values:
            if isinstance(v, str) and len(v) >= _MIN_SECRET and v not in _known:
                _known.add(v)
                added = True
        if added:
            alternatives = sorted(_known, key=len, reverse=True)
            _known_re = re.compile("|".join(re.escape(v) for v in alternatives))


def redact(text: str) -> str:
    """``text`` with remembered secrets, URL passwords, secret query parameters and
    ``Token``/``Bearer`` header values replaced by ``MASK``. Never raises."""
    try:
        known = _known_re
        if known is not None:
            text = known.sub(MASK, text)
        if "://" in text or "=" in text:
            text = mask_url(text)
        if "Token" in text or "Bearer" in text or "Basic" in text:
            text = _AUTH_HEADER.sub(lambda m: f"{m['k']}{MASK}", text)
        return text
    except Exception:  # pragma: no cover - never lose a log line over redaction
        return text


class _RedactingFactory:
    """A log record factory: records of ``provscope*`` loggers get their message
    formatted and redacted once, when they are made. A factory (not a filter) because a
    filter on the ``provscope`` logger does not see records of its child loggers, and a
    handler filter would depend on handlers the application installs."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def __call__(self, *args: Any, **kwargs: Any) -> logging.LogRecord:
        record = self.inner(*args, **kwargs)
        if record.name.startswith("provscope"):
            try:
                message = record.getMessage()
                clean = redact(message)
                if clean != message:
                    record.msg, record.args = clean, None
            except Exception:
                pass  # a message that cannot be formatted fails later, as it would anyway
        return record


_installed = False


def install_log_filter() -> None:
    """Redact every log record of provscope's loggers from now on. Idempotent."""
    global _installed
    with _known_lock:
        if _installed:
            return
        current = logging.getLogRecordFactory()
        if not isinstance(current, _RedactingFactory):
            logging.setLogRecordFactory(_RedactingFactory(current))
        _installed = True
