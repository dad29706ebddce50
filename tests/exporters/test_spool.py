"""The on-disk spool: order, restart replay, byte bound with counted drops, torn tails."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
from provscope.exporters.spool import Spool


def _drain(spool: Spool) -> list[tuple[bytes, int]]:
    out = []
    while (item := spool.peek()) is not None:
        out.append(item)
        spool.ack()
    return out


def test_payloads_come_back_oldest_first_across_segments(tmp_path):
    with Spool(tmp_path, max_bytes=1 << 20, segment_bytes=100) as spool:
        for i in range(50):
            spool.append(f"payload-{i}".encode(), count=i)
        assert spool.pending_records == 50
        assert spool.pending_count == sum(range(50))
        assert len(list(tmp_path.glob("*.seg"))) > 1
        got = _drain(spool)
    assert got == [(f"payload-{i}".encode(), i) for i in range(50)]


def test_peek_without_ack_returns_the_same_payload(tmp_path):
    with Spool(tmp_path) as spool:
        spool.append(b"a", 1)
        spool.append(b"b", 1)
        assert spool.peek() == (b"a", 1)
        assert spool.peek() == (b"a", 1)
        spool.ack()
        assert spool.peek() == (b"b", 1)


def test_a_new_spool_replays_what_a_closed_one_left_without_acked_payloads(tmp_path):
    with Spool(tmp_path, segment_bytes=64) as spool:
        for i in range(10):
            spool.append(bytes([i]) * 10, count=2)
        for _ in range(3):
            spool.peek()
            spool.ack()
    with Spool(tmp_path, segment_bytes=64) as again:
        assert again.pending_records == 7
        assert again.pending_count == 14
        got = _drain(again)
    assert [p for p, _ in got] == [bytes([i]) * 10 for i in range(3, 10)]
    assert list(tmp_path.glob("*.seg")) == []


def test_a_killed_process_leaves_a_spool_the_next_process_replays(tmp_path):
    script = textwrap.dedent(f"""
        import os
        from provscope.exporters.spool import Spool
        s = Spool({str(tmp_path)!r})
        for i in range(5):
            s.append(b"x%d" % i, 1)
        os._exit(0)  # no close(): only what reached the OS survives
    """)
    subprocess.run([sys.executable, "-c", script], check=True, timeout=60)
    with Spool(tmp_path) as spool:
        assert [p for p, _ in _drain(spool)] == [b"x%d" % i for i in range(5)]


def test_over_the_byte_bound_the_oldest_segment_is_dropped_and_counted(tmp_path):
    with Spool(tmp_path, max_bytes=1000, segment_bytes=200) as spool:
        for i in range(100):
            spool.append(b"%03d" % i + b"." * 47, count=3)
        assert spool.pending_bytes <= 1000
        kept = spool.pending_records
        assert spool.dropped_records == 100 - kept
        assert spool.dropped_count == 3 * (100 - kept)
        got = [p[:3] for p, _ in _drain(spool)]
    # What is left is the newest payloads, in order, with no gap.
    assert got == [b"%03d" % i for i in range(100 - kept, 100)]


def test_a_torn_tail_is_skipped_counted_and_appending_continues(tmp_path):
    with Spool(tmp_path) as spool:
        spool.append(b"first", 1)
        spool.append(b"second", 1)
    seg = next(tmp_path.glob("*.seg"))
    data = seg.read_bytes()
    seg.write_bytes(data[:-3])  # a write cut short by a crash
    with Spool(tmp_path) as spool:
        assert spool.torn_records == 1
        assert spool.pending_records == 1
        spool.append(b"third", 1)
        assert [p for p, _ in _drain(spool)] == [b"first", b"third"]


def test_a_corrupted_record_ends_its_segment_and_is_counted(tmp_path):
    with Spool(tmp_path) as spool:
        spool.append(b"good", 1)
        spool.append(b"will be damaged", 1)
    seg = next(tmp_path.glob("*.seg"))
    data = bytearray(seg.read_bytes())
    data[-2] ^= 0xFF
    seg.write_bytes(bytes(data))
    with Spool(tmp_path) as spool:
        assert spool.torn_records == 1
        assert [p for p, _ in _drain(spool)] == [b"good"]


def test_a_second_process_cannot_share_the_directory(tmp_path):
    script = f"from provscope.exporters.spool import Spool; Spool({str(tmp_path)!r})"
    with Spool(tmp_path):
        proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                              timeout=60)
        assert proc.returncode != 0
        assert "in use by another process" in proc.stderr
    subprocess.run([sys.executable, "-c", script], check=True, timeout=60)


def test_ack_after_the_peeked_segment_was_dropped_is_a_no_op(tmp_path):
    with Spool(tmp_path, max_bytes=300, segment_bytes=100) as spool:
        spool.append(b"a" * 90, 1)
        assert spool.peek()[0] == b"a" * 90
        for _ in range(5):
            spool.append(b"b" * 90, 1)
        assert spool.dropped_records >= 1
        before = spool.pending_records
        spool.ack()  # the peeked payload is gone: nothing else may be removed
        assert spool.pending_records == before


def test_closed_spool_refuses_appends(tmp_path):
    spool = Spool(tmp_path)
    spool.close()
    spool.close()
    with pytest.raises(ValueError, match="closed"):
        spool.append(b"x", 1)
