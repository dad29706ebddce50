"""The one rule for missing servers and tools in tests: skip outside CI, fail in CI."""

from __future__ import annotations

import pytest

from provscope.testing.required import in_ci, require_binary, unavailable


@pytest.mark.parametrize("value", ["1", "true", "YES"])
def test_in_ci_a_missing_server_fails_the_test(monkeypatch, value):
    monkeypatch.setenv("CI", value)
    assert in_ci()
    with pytest.raises(pytest.fail.Exception, match="required in CI but missing: influxd"):
        unavailable("influxd is not installed")


@pytest.mark.parametrize("value", [None, "", "0", "false"])
def test_outside_ci_a_missing_server_skips_the_test(monkeypatch, value):
    if value is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", value)
    assert not in_ci()
    with pytest.raises(pytest.skip.Exception, match="influxd is not installed"):
        unavailable(RuntimeError("influxd is not installed"))


def test_require_binary_finds_a_tool_or_names_its_package(monkeypatch, tmp_path):
    monkeypatch.delenv("CI", raising=False)
    tool = tmp_path / "mytool"
    tool.write_text("#!/bin/sh\n")
    tool.chmod(0o755)
    assert require_binary("mytool", "mypkg", str(tmp_path)) == str(tool)
    with pytest.raises(pytest.skip.Exception, match=r"nosuchtool is not installed \(package: pk"):
        require_binary("nosuchtool", "pkg", str(tmp_path))
