"""Configuration: one YAML file, ``PROVSCOPE_*`` environment variables, CLI ``--set`` flags.

Precedence, lowest first: built-in defaults < YAML file < environment < CLI flags.
Everything is validated at load into frozen models; an unknown key or a bad value raises
``ConfigError`` with one line naming the key, the value and what is allowed.

Every leaf setting ``a.b.c`` can be set from the environment as ``PROVSCOPE_A_B_C``
(see ``env_names()``; ``provscope config --defaults`` lists them).

With no servers configured (the default) everything goes to the embedded SQLite file:
``influxdb.url`` unset means time series go to ``embedded.path``; ``lineage.url`` unset
means lineage goes to the same file.
"""

from __future__ import annotations

import difflib
import logging
import os
import re
import socket
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, NamedTuple

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from provscope import env
from provscope.alerting import AlertsConfig
from provscope.errors import ConfigError
from provscope.redact import (
    DEFAULT_NAMES,
    MASK,
    install_log_filter,
    is_secret_name,
    mask_url,
    remember,
)

__all__ = [
    "AgentConfig",
    "AlertsConfig",
    "ClientConfig",
    "CollectorConfig",
    "Config",
    "EmbeddedConfig",
    "InfluxDBConfig",
    "LineageConfig",
    "PipelineConfig",
    "PrometheusConfig",
    "TorchConfig",
    "defaults_yaml",
    "env_names",
    "load_config",
]


def _check_url(v: str | None, schemes: tuple[str, ...], example: str) -> str | None:
    """A URL setting: a scheme this setting takes, ``://`` and a host (or a path for
    sqlite). Raises ValueError with what is allowed (the message never carries the URL:
    it may hold a password)."""
    if v is None:
        return None
    v = v.strip()
    m = re.match(r"^([A-Za-z][\w+.-]*)://(.*)$", v, re.S)
    scheme = m.group(1).lower().split("+")[0] if m else ""
    if not m or scheme not in schemes:
        raise ValueError(f"allowed: a URL {' or '.join(s + '://' for s in schemes)}..., "
                         f"e.g. {example}")
    rest = m.group(2)
    if scheme == "sqlite":
        if rest and (not rest.startswith("/") or len(rest) < 2):  # sqlite://: in memory
            raise ValueError(f"allowed: sqlite:///PATH.db (relative) or sqlite:////ABS/PATH.db, "
                             f"e.g. {example}")
        return v
    host = rest.split("/", 1)[0].split("?", 1)[0].rpartition("@")[2]
    if not host or host.startswith(":"):
        raise ValueError(f"allowed: a URL with a host, e.g. {example}")
    port = host.rpartition("]")[2].partition(":")[2] if ":" in host.rpartition("]")[2] else ""
    if port and not (port.isdigit() and 0 < int(port) < 65536):
        raise ValueError(f"allowed: a port 1..65535 after the host, e.g. {example}")
    return v


def _read_secret_file(path: str, key: str) -> str:
    """The first line of a secret file. Raises ConfigError naming the key and the path
    (never the contents)."""
    try:
        with open(Path(path).expanduser(), encoding="utf-8") as f:
            value = f.readline().rstrip("\r\n")
    except OSError as exc:
        raise ConfigError(f"{key}: {path!r} cannot be read: {exc.strerror}") from None
    remember(value)
    return value


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


class InfluxDBConfig(_Model):
    url: str | None = Field(None, description="InfluxDB base URL, e.g. http://127.0.0.1:8086. Unset: time series go to the embedded store.")
    api: Literal["v1", "v2", "v3"] = Field("v1", description="Write API: v1 /write (1.x, and 2.x/3.x compat), v2 /api/v2/write, v3 /api/v3/write_lp.")
    database: str = Field("provscope", description="v1/v3 database (v2: used as bucket when bucket is unset).")
    retention_policy: str | None = Field(None, description="v1 retention policy; unset: the database default.")
    username: str | None = Field(None, description="v1 user name.")
    password: str | None = Field(None, description="v1 password.")
    org: str | None = Field(None, description="v2 organisation.")
    bucket: str | None = Field(None, description="v2 bucket.")
    token: str | None = Field(None, description="v2/v3 API token.")
    password_file: str | None = Field(None, description="File whose first line is the v1 password (instead of influxdb.password; keeps it out of config files, the environment and process listings).")
    token_file: str | None = Field(None, description="File whose first line is the v2/v3 API token (instead of influxdb.token).")
    tls_verify: bool = Field(True, description="https: verify the server's certificate and host name. false only for a test server with a self-signed certificate (logged as a warning).")
    tls_ca_file: str | None = Field(None, description="https: CA bundle (PEM) to verify the server with; unset: the system's CAs.")
    create_database: bool = Field(True, description="v1: issue CREATE DATABASE on start (idempotent).")
    batch_size: int = Field(5000, ge=1, le=1_000_000, description="Points per write request.")
    flush_interval_s: float = Field(1.0, gt=0, le=3600, description="Longest time a point waits before its batch is sent, seconds.")
    gzip: bool = Field(True, description="gzip request bodies.")
    timeout_s: float = Field(10.0, gt=0, le=600, description="HTTP timeout per request, seconds.")
    max_retries: int = Field(3, ge=0, le=100, description="Immediate retries (exponential backoff with jitter) before a batch goes to the spool.")
    retry_backoff_s: float = Field(0.2, gt=0, le=60, description="Backoff window of the first retry, seconds; doubles each retry (the delay is drawn uniformly below it: full jitter).")
    max_backoff_s: float = Field(30.0, gt=0, le=3600, description="Cap on the retry delay and on Retry-After, seconds.")
    spool_dir: str | None = Field(None, description="Directory of the on-disk spool. Unset: $XDG_STATE_HOME/provscope/spool or ~/.local/state/provscope/spool.")
    spool_max_bytes: int = Field(1 << 30, ge=1 << 16, description="Spool size limit in bytes; when full, the oldest segment is dropped and counted.")

    @field_validator("url")
    @classmethod
    def _http_url(cls, v: str | None) -> str | None:
        return _check_url(v, ("http", "https"), "http://127.0.0.1:8086")

    def secret(self, name: Literal["password", "token"]) -> str | None:
        """The password or token: the ``*_file``'s first line when that is set, else the
        setting itself. Read at each call (a rotated file is picked up by a new writer)."""
        path = getattr(self, f"{name}_file")
        if path:
            return _read_secret_file(path, f"influxdb.{name}_file")
        return getattr(self, name)


class LineageConfig(_Model):
    url: str | None = Field(None, description="Lineage store URL: sqlite:///path.db or postgresql://user@host:port/db (the password from PGPASSWORD or ~/.pgpass / PGPASSFILE rather than the URL; TLS: ?sslmode=verify-full). Unset: the embedded file.")
    batch_size: int = Field(1000, ge=1, le=100_000, description="Lineage records per transaction.")

    @field_validator("url")
    @classmethod
    def _db_url(cls, v: str | None) -> str | None:
        return _check_url(v, ("sqlite", "postgresql", "postgres"),
                          "sqlite:///PATH.db or postgresql://USER@HOST:PORT/DB")
    flush_interval_s: float = Field(1.0, gt=0, le=3600, description="Longest time a lineage record waits before it is written, seconds.")
    lost_after_s: float = Field(180.0, gt=0, le=86_400 * 30, description="A run still running whose last heartbeat (client.heartbeat_s) is older than this is lost: the node agent marks it and its open tasks lost in the store, and provscope runs / provscope.query show it lost, seconds. Keep it several heartbeats long.")


class EmbeddedConfig(_Model):
    path: str = Field("provscope.db", description="SQLite file of the embedded store (time series and lineage when no server is set).")


class PipelineConfig(_Model):
    queue_size: int = Field(200_000, ge=100, le=100_000_000, description="Records held in memory per exporter; when full the oldest is dropped and counted.")
    shutdown_timeout_s: float = Field(10.0, gt=0, le=3600, description="Deadline for the final flush at exit, seconds.")


class CollectorConfig(_Model):
    enabled: bool = Field(True, description="Run this collector.")
    interval_s: float | None = Field(None, gt=0, le=3600, description="Sampling interval, seconds; unset: agent.interval_s.")
    on_startup_error: Literal["error", "ignore", "retry"] = Field("ignore", description="When the collector cannot open: error (agent exits), ignore (one warning), retry (every minute).")


class FilesystemCollectorConfig(CollectorConfig):
    paths: tuple[str, ...] = Field(("/",), description="Mount points / directories whose usage is sampled (the job's working and checkpoint dirs are added by `provscope run`).")


class CollectorsConfig(_Model):
    cpu: CollectorConfig = CollectorConfig()
    memory: CollectorConfig = CollectorConfig()
    disk: CollectorConfig = CollectorConfig()
    net: CollectorConfig = CollectorConfig()
    filesystem: FilesystemCollectorConfig = FilesystemCollectorConfig(interval_s=10.0)
    process: CollectorConfig = CollectorConfig()
    nvml: CollectorConfig = CollectorConfig()
    amdsmi: CollectorConfig = CollectorConfig()
    health: CollectorConfig = CollectorConfig()


class AgentConfig(_Model):
    socket_path: str | None = Field(None, description="Unix socket the agent listens on for local jobs. Unset: $XDG_RUNTIME_DIR/provscope/agent.sock or <tmp>/provscope-<uid>/agent.sock.")
    interval_s: float = Field(1.0, gt=0, le=3600, description="Default sampling interval of the collectors, seconds.")
    collectors: CollectorsConfig = CollectorsConfig()


class PrometheusConfig(_Model):
    enabled: bool = Field(True, description="Serve /metrics from the agent.")
    address: str = Field("127.0.0.1", description="Address /metrics binds to.")
    port: int = Field(9464, ge=0, le=65535, description="Port of /metrics (0: any free port).")
    expire_s: float = Field(60.0, gt=0, description="A series not updated for this long disappears from /metrics, seconds.")
    layers: bool = Field(False, description="Also expose layer statistics (measurements layer, layer_param) on /metrics, labelled layer and module_type; off: they go to the stores only, counted as skipped.")
    max_series: int = Field(20_000, ge=100, description="Most series /metrics holds; a point that would add one more is skipped and counted.")
    max_scalar_names: int = Field(100, ge=0, description="Most distinct names of uncatalogued training scalars under provscope_train_scalar; others are skipped and counted.")


class ClientConfig(_Model):
    destination: Literal["auto", "agent", "own"] = Field("auto", description="Where the job's records go. auto: to its own stores when its config names one (influxdb.url, lineage.url or embedded.path differ from their defaults, from any source) and the listening agent writes elsewhere, else to the agent when one listens; agent: to the agent when one listens; own: always to its own stores. A listening agent still watches the job's processes in every case.")
    no_agent: Literal["embedded", "drop"] = Field("embedded", description="When no agent listens: run the pipeline inside the job (embedded) or count and drop.")
    buffer_size: int = Field(100_000, ge=100, le=100_000_000, description="Records the in-job buffer holds; when full the oldest is dropped and counted.")
    reconnect_s: float = Field(2.0, gt=0, le=3600, description="Longest wait between the in-job client's attempts to reach the agent socket, seconds (backoff with full jitter from 50 ms up to it).")
    resend_max_bytes: int = Field(64 << 20, ge=1 << 16, le=1 << 34, description="Bytes of frames the in-job client keeps after sending them until the agent acknowledges them (and sends again to a restarted agent); its records are bounded by buffer_size too. While it is full nothing more is sent and new records wait in the buffer.")
    hash_max_bytes: int = Field(1 << 30, ge=0, description="Files up to this size get a sha256 digest in use()/produce(); larger ones record size and mtime only.")
    step_task_every: int = Field(100, ge=0, description="run.steps() records one step task every N steps (0: none); every step still logs step_time_seconds.")
    identity_wait_s: float = Field(10.0, ge=0, le=600, description="A rank other than 0 of a job with no launcher id waits up to this long, once, for rank 0's run id over torch.distributed, seconds (then it records under its own run id).")
    heartbeat_s: float = Field(30.0, ge=0, le=86_400, description="Every this many seconds a job's open runs record a heartbeat (the run row's heartbeat_ns), so that a job killed without a word ends lost after lineage.lost_after_s, seconds (0: no heartbeats; such runs are never marked lost).")
    handle_sigterm: bool = Field(True, description="On SIGTERM (when the job has no handler of its own), end the job's open runs and tasks as killed and flush for up to 5 s before the process dies of the signal as it would have.")
    telemetry: bool = Field(True, description="When the job runs its own pipeline (no agent): sample the node, the job's process tree and its GPUs in the job, on one background thread.")
    telemetry_interval_s: float = Field(5.0, ge=0.1, le=3600, description="Sampling interval of the in-job telemetry, seconds (one sample at start and one at exit as well).")
    telemetry_collectors: tuple[Literal["cpu", "memory", "disk", "net", "process", "nvml"], ...] = Field(("cpu", "memory", "disk", "net", "process", "nvml"), description="Collectors the in-job telemetry runs (the agent's collectors of the same names; nvml reads only the job's own GPUs).")


class TorchConfig(_Model):
    every: int = Field(10, ge=1, description="Layer statistics every N steps.")
    max_layers: int = Field(512, ge=1, description="Most layers watched at once; beyond it the first ones are watched and one line names the count and this setting.")


class RedactConfig(_Model):
    names: tuple[str, ...] = Field(DEFAULT_NAMES, description="Last words of secret-looking names: the value of a command-line option (--api-token X), a KEY=VALUE word, or a task param / run config key whose last word (split at - _ . and the like) is one of these is recorded as *** (docs/security.md). [] turns masking of recorded command lines and params off.")


class Config(_Model):
    """The whole configuration. Build it with ``load_config``; it is immutable."""

    host: str | None = Field(None, description="Host name written on every series and row. Unset: the machine's host name.")
    influxdb: InfluxDBConfig = InfluxDBConfig()
    lineage: LineageConfig = LineageConfig()
    embedded: EmbeddedConfig = EmbeddedConfig()
    pipeline: PipelineConfig = PipelineConfig()
    agent: AgentConfig = AgentConfig()
    prometheus: PrometheusConfig = PrometheusConfig()
    client: ClientConfig = ClientConfig()
    torch: TorchConfig = TorchConfig()
    alerts: AlertsConfig = AlertsConfig()
    redact: RedactConfig = RedactConfig()

    @property
    def host_name(self) -> str:
        """``host`` or the machine's host name."""
        return self.host or socket.gethostname()

    @property
    def lineage_url(self) -> str:
        """The lineage URL actually used (the embedded file when ``lineage.url`` is unset)."""
        return self.lineage.url or f"sqlite:///{Path(self.embedded.path).expanduser()}"


# ----------------------------------------------------------------------------- loading

log = logging.getLogger("provscope.config")

#: Label of ``overrides`` in messages: the CLI's flag; ``workflow()`` passes its own.
OVERRIDES_SOURCE = "--set"


def _leaves(model: type[BaseModel], prefix: str = "") -> dict[str, Any]:
    """Dotted key -> FieldInfo for every leaf setting."""
    out: dict[str, Any] = {}
    for name, info in model.model_fields.items():
        key = f"{prefix}{name}"
        ann = info.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out.update(_leaves(ann, key + "."))
        else:
            out[key] = info
    return out


def _sections(model: type[BaseModel], prefix: str = "") -> set[str]:
    """Dotted keys of the sections (``influxdb``, ``agent.collectors.cpu``, ...)."""
    out: set[str] = set()
    for name, info in model.model_fields.items():
        ann = info.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out.add(prefix + name)
            out |= _sections(ann, f"{prefix}{name}.")
    return out


def _dict_leaves(model: type[BaseModel] | None = None,
                 prefix: str = "") -> dict[str, type[BaseModel]]:
    """Dotted key -> item model of the settings that map names to models (``alerts.rules``):
    their entries are set one key at a time (``alerts.rules.NAME.KEY``)."""
    model = Config if model is None else model
    out: dict[str, type[BaseModel]] = {}
    for name, info in model.model_fields.items():
        ann = info.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out.update(_dict_leaves(ann, f"{prefix}{name}."))
        elif getattr(ann, "__origin__", None) is dict:
            item = ann.__args__[1]  # type: ignore[union-attr]
            if isinstance(item, type) and issubclass(item, BaseModel):
                out[prefix + name] = item
    return out


def _entry_of(key: str) -> str | None:
    """``alerts.rules.NAME`` for a key under a mapping setting's entry, else None."""
    for leaf in _dict_leaves():
        if key.startswith(leaf + "."):
            return ".".join(key.split(".")[:leaf.count(".") + 2])
    return None


def _under_dict_leaf(key: str) -> bool:
    """True for ``alerts.rules.NAME`` and ``alerts.rules.NAME.KEY``."""
    return any(key.startswith(leaf + ".") and 0 < key.count(".") - leaf.count(".") <= 2
               for leaf in _dict_leaves())


def env_names() -> dict[str, str]:
    """Map ``PROVSCOPE_*`` environment variable -> dotted setting key."""
    return {env.PREFIX + k.upper().replace(".", "_"): k for k in _leaves(Config)}


def _other_env_names() -> set[str]:
    """The ``PROVSCOPE_*`` variables of ``provscope.env`` that are not settings."""
    return {v for k, v in vars(env).items()
            if k.isupper() and isinstance(v, str) and v.startswith(env.PREFIX) and v != env.PREFIX}


_reported_env: set[str] = set()


def check_environment(environ: Mapping[str, str] | None = None) -> list[str]:
    """Warn once per process about each ``PROVSCOPE_*`` variable that provscope does not
    know (neither a setting nor one of ``provscope.env``'s names), naming the closest valid
    name. Never raises. Returns the unknown names found in this call."""
    environ = os.environ if environ is None else environ
    known = set(env_names()) | _other_env_names()
    unknown = [v for v in environ if v.startswith(env.PREFIX) and v not in known]
    for var in unknown:
        if var in _reported_env:
            continue
        _reported_env.add(var)
        close = difflib.get_close_matches(var, sorted(known), n=1, cutoff=0.6)
        hint = f"did you mean {close[0]}?" if close else "see `provscope config --env`"
        log.warning("provscope: environment variable %s is not a provscope setting and is "
                    "ignored; %s", var, hint)
    return unknown


def _set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[parts[-1]] = value


def _parse_scalar(text: str) -> Any:
    try:
        return yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        return text


def _allowed_keys(path: Sequence[str | int]) -> str:
    model: type[BaseModel] = Config
    parts = [str(p) for p in path[:-1]]
    i = 0
    while i < len(parts):
        field = model.model_fields.get(parts[i])
        item = _dict_leaves().get(".".join(parts[:i + 1]))
        if item is not None and i + 1 < len(parts):  # alerts.rules.NAME: the item's keys
            model = item
            i += 2
            continue
        if field is None or not (isinstance(field.annotation, type)
                                 and issubclass(field.annotation, BaseModel)):
            return ""
        model = field.annotation
        i += 1
    return ", ".join(info.alias or name for name, info in model.model_fields.items())


class _Item(NamedTuple):
    """One setting as one source gave it."""

    key: str
    value: Any
    source: str


def _unknown(source: str, key: str) -> str:
    allowed = _allowed_keys(key.split("."))
    where = f"; allowed keys here: {allowed}" if allowed else \
        "; see `provscope config --defaults` for all keys"
    close = difflib.get_close_matches(key, sorted(_leaves(Config)), n=1, cutoff=0.6)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"{source}: unknown key {key!r}{where}{hint}"


def _flatten(tree: Mapping[str, Any], source: str, items: list[_Item],
             problems: list[str], prefix: str = "") -> None:
    leaves, sections = _leaves(Config), _sections(Config)
    for name, value in tree.items():
        key = f"{prefix}{name}"
        if key in _dict_leaves() and isinstance(value, Mapping):
            items.extend(_entries(key, value, source))
        elif key in leaves:
            items.append(_Item(key, value, source))
        elif key in sections and isinstance(value, Mapping):
            _flatten(value, source, items, problems, key + ".")
        elif key in sections:
            items.append(_Item(key, value, source))  # validation names what it must be
        else:
            problems.append(_unknown(source, key))


def _entries(key: str, value: Mapping[str, Any], source: str) -> list[_Item]:
    """Items of a mapping setting (``alerts.rules``), one per key of each entry, so that a
    problem names exactly that key and sources merge key by key."""
    out = [_Item(key, {}, source)] if not value else []
    for name, entry in value.items():
        if isinstance(entry, Mapping) and entry:
            out.extend(_Item(f"{key}.{name}.{k}", v, source) for k, v in entry.items())
        else:
            out.append(_Item(f"{key}.{name}", entry, source))
    return out


def _read_yaml(path: str | os.PathLike[str]) -> dict[str, Any]:
    try:
        text = Path(path).expanduser().read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"config file {str(path)!r} cannot be read: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {str(path)!r} is not UTF-8 text (byte {exc.start}); "
                          "allowed: a YAML document in UTF-8") from None
    try:
        loaded = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        # One line: a reader error's text spans two ("... in <unicode string>, position 0").
        problem = " ".join(str(getattr(exc, "problem", None) or exc).split())
        raise ConfigError(f"{path}{where}: not valid YAML ({problem})") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(loaded).__name__}")
    return loaded


def _bad_value(err: Mapping[str, Any], item: _Item | None) -> str:
    key = ".".join(str(p) for p in err["loc"] if p != "[key]")
    msg = str(err["msg"])
    if msg.startswith("Input should be "):
        msg = "allowed: " + msg[len("Input should be "):]
    msg = msg.removeprefix("Value error, ")
    source = item.source if item is not None else "config"
    if err.get("type") == "extra_forbidden":
        allowed = _allowed_keys(err["loc"])
        return f"{source}: unknown key {key!r}" + (f"; allowed keys here: {allowed}" if allowed else "")
    if item is not None and item.key.startswith(key + "."):  # a problem of a whole entry
        return f"{source}: {key}: {msg}"
    if item is not None and item.key != key:  # an element of a list setting
        return f"{source}: {item.key} = {shown(item.key, item.value)} is not allowed ({key}: {msg})"
    return f"{source}: {key} = {shown(key, err.get('input'))} is not allowed; {msg}"


def shown(key: str, value: Any) -> str:
    """How a setting's value appears in messages and ``provscope config``: ``***`` for a
    secret (a key whose last word looks secret, e.g. ``influxdb.password``), a URL with
    its password masked, else ``repr``."""
    if value is not None and is_secret_name(key.rsplit(".", 1)[-1]) \
            and not key.endswith("_file"):
        return MASK
    if isinstance(value, str) and "@" in value and key.endswith("url"):
        # Even a malformed URL (htp:/user:pw@host) loses its password in a message.
        return repr(re.sub(r"(?<=:)[^:@/]*(?=@)", MASK, value))
    if isinstance(value, str) and "://" in value:
        return repr(mask_url(value))
    return repr(value)


def redacted(config: Config) -> dict[str, Any]:
    """``config`` as plain data for display (``provscope config``): passwords and tokens
    as ``***``, URLs without their passwords."""
    def walk(obj: Any, prefix: str) -> Any:
        if isinstance(obj, dict):
            return {k: walk(v, f"{prefix}{k}.") for k, v in obj.items()}
        key = prefix[:-1]
        if obj is not None and is_secret_name(key.rsplit(".", 1)[-1]) \
                and not key.endswith("_file"):
            return MASK
        return mask_url(obj) if isinstance(obj, str) and "://" in obj else obj

    return walk(config.model_dump(mode="json"), "")


def _remember_secrets(config: Config) -> None:
    """Teach the log redaction this configuration's secrets (and install it)."""
    install_log_filter()
    ic = config.influxdb
    remember(ic.password, ic.token)
    for url in (ic.url, config.lineage.url):
        m = re.match(r"^[A-Za-z][\w+.-]*://[^/?#@]*:([^/?#@]+)@", url or "")
        if m:
            remember(m.group(1))


def _owner(items: list[_Item], loc: Sequence[Any]) -> int | None:
    """Index of the item that set the value at ``loc`` (the last source wins)."""
    dotted = ".".join(str(p) for p in loc if p != "[key]")  # "[key]": a mapping's key
    for i in range(len(items) - 1, -1, -1):
        key = items[i].key
        if dotted == key or dotted.startswith(key + "."):
            return i
    for i in range(len(items) - 1, -1, -1):  # an entry's own check: blame its last key
        if items[i].key.startswith(dotted + "."):
            return i
    return None


def load_config(
    path: str | os.PathLike[str] | None = None,
    *,
    overrides: Mapping[str, Any] | Sequence[str] | None = None,
    environ: Mapping[str, str] | None = None,
    overrides_source: str = OVERRIDES_SOURCE,
    report: Callable[[str], Any] | None = None,
) -> Config:
    """Load, merge and validate the configuration.

    Args:
        path: YAML file; None reads ``$PROVSCOPE_CONFIG`` when set, else defaults only.
        overrides: dotted keys to values (``{"influxdb.url": "http://..."}``) or
            ``["influxdb.url=http://..."]`` strings as given to ``--set``.
        environ: environment to read ``PROVSCOPE_*`` from (default ``os.environ``).
        overrides_source: how messages name ``overrides`` (``--set``,
            ``workflow(settings=...)``).
        report: None (strict): the first problem raises. A callable (lenient, for jobs):
            each problem is passed to it as one line and only that setting is ignored;
            every valid setting is kept.

    Unknown ``PROVSCOPE_*`` variables are logged once per process (``check_environment``),
    never an error.

    Returns:
        The frozen ``Config``.

    Raises:
        ConfigError: (strict only) one line naming the source, the key, the value and what
            is allowed.
    """
    environ = os.environ if environ is None else environ
    items: list[_Item] = []
    problems: list[str] = []

    def problem(line: str) -> None:
        if report is None:
            raise ConfigError(line)
        problems.append(line)

    path = path or environ.get(env.CONFIG) or None
    if path is not None:
        try:
            _flatten(_read_yaml(path), str(path), items, problems)
        except ConfigError as exc:
            problem(str(exc))
    if problems and report is None:
        raise ConfigError(problems[0])
    names = env_names()
    for var, value in environ.items():
        if var.startswith(env.PREFIX) and var in names:
            parsed = _parse_scalar(value)
            if names[var] in _dict_leaves() and isinstance(parsed, Mapping):
                items.extend(_entries(names[var], parsed, var))
            else:
                items.append(_Item(names[var], parsed, var))
    check_environment(environ)
    if overrides:
        pairs: Iterable[tuple[str, Any]]
        if isinstance(overrides, Mapping):
            pairs = [(str(k), v) for k, v in overrides.items()]
        else:
            pairs = []
            for text in overrides:
                try:
                    pairs.append(split_override(text))
                except ConfigError as exc:
                    problem(str(exc))
        leaves = _leaves(Config)
        for key, value in pairs:
            if key in leaves or _under_dict_leaf(key):
                items.append(_Item(key, value, overrides_source))
            else:
                problem(_unknown(overrides_source, key))
    blamed: set[str] = set()  # entries of mapping settings blamed in an earlier round
    for _ in range(len(items) + 1):
        tree: dict[str, Any] = {}
        for item in items:
            _set_dotted(tree, item.key, item.value)
        try:
            config = Config.model_validate(tree)
            break
        except ValidationError as exc:
            errors = exc.errors()
            if report is None:
                i = _owner(items, errors[0]["loc"])
                extra = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
                raise ConfigError(_bad_value(errors[0], items[i] if i is not None else None)
                                  + extra) from None
            bad: set[int] = set()
            entries: set[str] = set()
            for err in errors:
                i = _owner(items, err["loc"])
                if i is None or i in bad:
                    continue
                bad.add(i)
                entry = _entry_of(items[i].key)
                if entry is not None:
                    entries.add(entry)
                    if entry in blamed:  # the same entry again, after its bad key went
                        continue
                problems.append(_bad_value(err, items[i]))
            blamed |= entries
            if not bad:  # nothing to blame: keep the defaults rather than fail the job
                problems.append(f"config: {errors[0]['msg']}; using the defaults")
                config = Config()
                break
            items = [it for j, it in enumerate(items) if j not in bad]
    else:  # pragma: no cover - each round removes at least one item
        config = Config()
    _remember_secrets(config)
    if report is not None:
        for line in problems:
            try:
                report(line)
            except Exception:
                log.debug("config report failed", exc_info=True)
    return config


def split_override(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE, e.g. influxdb.url=http://127.0.0.1:8086")
    return key.strip(), _parse_scalar(value)


def defaults_yaml() -> str:
    """A commented YAML sample of every setting with its default (Telegraf sample.conf style)."""
    lines = [
        "# provscope configuration. Every setting is shown commented out with its default.",
        "# Load with `--config FILE` or $PROVSCOPE_CONFIG; each key a.b.c can also be set",
        "# as the environment variable PROVSCOPE_A_B_C or with `--set a.b.c=VALUE`.",
    ]

    def walk(model: BaseModel, indent: int) -> None:
        pad = "  " * indent
        for name, info in type(model).model_fields.items():
            value = getattr(model, name)
            if isinstance(value, BaseModel):
                lines.append("")
                lines.append(f"# {pad}{name}:")
                walk(value, indent + 1)
                continue
            if isinstance(value, dict) and value and all(
                    isinstance(v, BaseModel) for v in value.values()):
                if info.description:
                    lines.append(f"## {pad}{info.description}")
                lines.append(f"# {pad}{name}:")
                for entry_name, entry in value.items():
                    dumped = yaml.safe_dump(entry.model_dump(mode="json", exclude_defaults=True),
                                            default_flow_style=True, sort_keys=False, width=10_000)
                    lines.append(f"# {pad}  {entry_name}: {dumped.strip()}")
                continue
            if info.description:
                lines.append(f"## {pad}{info.description}")
            dumped = yaml.safe_dump(list(value) if isinstance(value, tuple) else value,
                                    default_flow_style=True, width=10_000).strip()
            dumped = dumped.removesuffix("\n...").removesuffix("...").strip()
            lines.append(f"# {pad}{name}: {dumped}")

    walk(Config(), 0)
    return "\n".join(lines) + "\n"
