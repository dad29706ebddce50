"""Fuzzing the config loader: YAML documents, ``PROVSCOPE_*`` variables and ``--set``
strings. Each input gives a ``Config`` or one ``ConfigError`` line (strict), and the
lenient loader a job uses never raises at all (each bad setting is reported as one line
and ignored)."""

from __future__ import annotations

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from provscope.config import Config, _leaves, load_config
from provscope.errors import ConfigError
from tests.faults.fuzzing import fuzz_settings

pytestmark = [pytest.mark.faults]

KEYS = sorted(_leaves(Config))
SECTIONS = sorted({k.rsplit(".", 1)[0] for k in KEYS if "." in k})
text = st.text(max_size=40)
scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70),
                    st.floats(allow_nan=True, allow_infinity=True), text)
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(text, inner, max_size=3)), max_leaves=6)
keys = st.one_of(st.sampled_from(KEYS), st.sampled_from(SECTIONS),
                 st.sampled_from(KEYS).map(lambda k: k + "." + "x"), text)


def _nested(flat: dict[str, object]) -> dict[str, object]:
    out: dict[str, object] = {}
    for key, value in flat.items():
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = node[part] = {}
            node = child
        node[parts[-1]] = value
    return out


def _check(load) -> None:
    try:
        config = load(None)
    except ConfigError as exc:
        message = str(exc)
        assert message and "\n" not in message, message  # one line
        assert "Traceback" not in message
    else:
        assert isinstance(config, Config)
    lines: list[str] = []
    config = load(lines.append)  # lenient: never raises
    assert isinstance(config, Config)
    assert all(line and "\n" not in line for line in lines), lines


def test_yaml_documents(tmp_path, long_run):
    path = tmp_path / "provscope.yaml"

    @fuzz_settings(800, long_run)
    @given(st.one_of(
        st.dictionaries(keys, values, max_size=4).map(_nested).map(yaml.safe_dump),
        st.dictionaries(keys, values, max_size=4).map(yaml.safe_dump),
        st.text(max_size=200),
        st.binary(max_size=100),
    ))
    def run(document: str | bytes) -> None:
        if isinstance(document, bytes):
            path.write_bytes(document)
        else:
            path.write_text(document, encoding="utf-8", errors="surrogatepass")
        _check(lambda report: load_config(path, environ={}, report=report))

    run()


def test_environment_variables(long_run):
    names = st.one_of(st.sampled_from(KEYS), text).map(
        lambda k: "PROVSCOPE_" + k.upper().replace(".", "_"))

    @fuzz_settings(800, long_run)
    @given(st.dictionaries(names, st.text(max_size=60).filter(lambda v: "\x00" not in v),
                           max_size=4))
    def run(environ: dict[str, str]) -> None:
        _check(lambda report: load_config(environ=environ, report=report))

    run()


def test_set_strings(long_run):
    flag = st.one_of(
        st.tuples(keys, st.text(max_size=40)).map(lambda kv: f"{kv[0]}={kv[1]}"),
        st.tuples(keys, values).map(lambda kv: f"{kv[0]}={yaml.safe_dump(kv[1]).strip()}"),
        st.text(max_size=60),
    )

    @fuzz_settings(800, long_run)
    @given(st.lists(flag, max_size=4))
    def run(flags: list[str]) -> None:
        _check(lambda report: load_config(overrides=flags, environ={}, report=report))

    run()
