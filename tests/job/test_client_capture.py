"""File digests with a size cap, code and environment capture."""

from __future__ import annotations

import hashlib
import subprocess
import sys

from provscope.job import capture


def test_small_files_get_a_streaming_sha256(tmp_path):
    path = tmp_path / "data.bin"
    payload = bytes(range(256)) * 5000  # > one read buffer
    path.write_bytes(payload)
    found = capture.describe_path(path, max_bytes=10 << 20)
    assert found["digest"] == "sha256:" + hashlib.sha256(payload).hexdigest()
    assert found["size_bytes"] == len(payload) and found["uri"] == path.as_uri()
    assert "mtime_ns" in found["attributes"]


def test_files_over_the_cap_record_size_and_mtime_but_no_digest(tmp_path):
    path = tmp_path / "big.bin"
    path.write_bytes(b"\1" * 4096)
    found = capture.describe_path(str(path), max_bytes=1000)
    assert found["digest"] is None and found["size_bytes"] == 4096
    assert "client.hash_max_bytes=1000" in found["attributes"]["digest_skipped"]
    assert found["attributes"]["mtime_ns"] > 0


def test_directories_uris_and_missing_paths_are_described(tmp_path):
    (tmp_path / "a").write_bytes(b"12")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b").write_bytes(b"345")
    folder = capture.describe_path(tmp_path, max_bytes=1 << 20)
    assert folder["size_bytes"] == 5 and folder["attributes"]["files"] == 2
    assert folder["digest"] is None
    uri = capture.describe_path("hf://datasets/org/name", max_bytes=1 << 20)
    assert uri["uri"] == "hf://datasets/org/name" and uri["name"] == "name"
    missing = capture.describe_path(tmp_path / "nope", max_bytes=1 << 20)
    assert missing["attributes"]["exists"] is False


def test_only_existing_paths_or_pathlike_values_count_as_paths(tmp_path):
    (tmp_path / "x.csv").write_text("1")
    assert capture.looks_like_path(str(tmp_path / "x.csv"))
    assert capture.looks_like_path(tmp_path / "not-yet.pt")
    assert not capture.looks_like_path("adam")
    assert not capture.looks_like_path(str(tmp_path / "missing.csv"))
    assert not capture.looks_like_path("s3://bucket/key")


def test_code_version_reads_commit_and_dirty_flag(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    git = ["git", "-C", str(repo), "-c", "user.email=t@example.org", "-c", "user.name=t"]
    subprocess.run([*git, "init", "-q"], check=True)
    (repo / "train.py").write_text("print(1)\n")
    subprocess.run([*git, "add", "train.py"], check=True)
    subprocess.run([*git, "commit", "-qm", "init"], check=True)
    head = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True,
                          check=True).stdout.strip()
    clean = capture.code_version.__wrapped__(str(repo))
    assert clean["commit"] == head and clean["dirty"] is False
    (repo / "train.py").write_text("print(2)\n")
    assert capture.code_version.__wrapped__(str(repo))["dirty"] is True
    assert capture.code_version.__wrapped__(str(tmp_path)) == {}


def test_environment_and_resources_use_base_units():
    envinfo = capture.environment()
    assert envinfo["python"] == ".".join(map(str, sys.version_info[:3]))
    meter = capture.ResourceMeter()
    sum(i * i for i in range(200_000))
    used = meter.stop()
    assert used["cpu_seconds"] > 0 and used["peak_rss_bytes"] > 1 << 20
    assert {"read_bytes", "write_bytes"} <= set(used)
