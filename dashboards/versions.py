"""The content version of each dashboard and the digest of the content it names.

When a change to the dashboards' code changes a dashboard's generated JSON, its digest
changes and the build stamps the next version; ``tests/dashboards/test_build.py`` then
fails until this table records the new version and digest and
``docs/dashboards-changelog.md`` says what changed. A release alone changes nothing here:
the provscope version is stamped in after the digest is taken.
"""

from __future__ import annotations

__all__ = ["VERSIONS"]

#: uid -> (content version, content digest).
VERSIONS: dict[str, tuple[int, str]] = {
    "provscope-overview": (2, "058a31d2fdcb3710"),
    "provscope-training": (1, "1a0e8d934d0ebcf5"),
    "provscope-layers": (1, "8b45364b791ba0ca"),
    "provscope-nodes": (1, "8f798b8ddb886b23"),
    "provscope-lineage": (1, "d090219319e65e77"),
}
