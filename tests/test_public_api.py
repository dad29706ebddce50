"""The curated ``provscope`` namespace: every name in ``__all__`` resolves, lazily."""

from __future__ import annotations

import subprocess
import sys

import pytest

import provscope


def test_every_public_name_resolves():
    missing = [name for name in provscope.__all__ if getattr(provscope, name, None) is None]
    assert missing == []
    assert callable(provscope.workflow) and callable(provscope.task)
    assert hasattr(provscope.query, "runs")
    assert sorted(provscope.__all__) == sorted(set(provscope.__all__))


def test_importing_provscope_loads_neither_torch_nor_the_client():
    code = ("import sys, provscope; "
            "print('torch' in sys.modules, 'provscope.job.api' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=60).stdout.split()
    assert out == ["False", "False"]


def test_unknown_attribute_is_a_plain_attribute_error():
    with pytest.raises(AttributeError, match="no_such_thing"):
        provscope.no_such_thing  # noqa: B018
