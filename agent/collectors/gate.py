"""Which GPU getters to call this sample: permanent "not supported", backoff after errors.

A GPU library answers each (device, field) query on its own: a field the device lacks
fails the same way forever, a transient error (a busy driver, a permission glitch, a
counter not ready yet) fails for a while and then works again. ``FieldGate`` keeps that
state per key, so one bad answer never removes a field for good:

- ``permanent(key)``: the device does not have it (``NOT_SUPPORTED``, the driver lacks
  the function); never asked again, logged once.
- ``failed(key, ...)``: left out of this sample and asked again after 1, 2, 4 ... s,
  capped at ``cap_s`` (300 s); the first failure is logged once, the recovery once.
- ``ok(key)``: the next failure starts again from the first delay.

Times are the collector's ``now_ns`` (wall clock, one value per sample), so a test drives
the backoff with the timestamps it passes to ``collect``.
"""

from __future__ import annotations

import logging
from collections.abc import Hashable

from provscope.backoff import backoff_delay

__all__ = ["FieldGate"]


class FieldGate:
    """Per-key admission for getters that may be unsupported or fail for a while.

    Args:
        logger: where the one line per key goes.
        prefix: the collector's name, first word of each line (``nvml``).
        base_s: delay before the first retry, seconds.
        cap_s: longest delay between retries, seconds.
    """

    def __init__(self, logger: logging.Logger, prefix: str, *, base_s: float = 1.0,
                 cap_s: float = 300.0) -> None:
        self._log = logger
        self._prefix = prefix
        self._base_s = base_s
        self._cap_s = cap_s
        self._never: set[Hashable] = set()
        # key -> (failures in a row, earliest retry in ns)
        self._failing: dict[Hashable, tuple[int, int]] = {}
        self._logged: set[Hashable] = set()

    def allowed(self, key: Hashable, now_ns: int) -> bool:
        """Whether to call the getter for ``key`` in the sample stamped ``now_ns``."""
        if key in self._never:
            return False
        state = self._failing.get(key)
        return state is None or now_ns >= state[1]

    def is_permanent(self, key: Hashable) -> bool:
        return key in self._never

    def permanent(self, key: Hashable, what: str) -> None:
        """``key`` is not supported: never asked again (``what`` names it in the log)."""
        self._failing.pop(key, None)
        if key not in self._never:
            self._never.add(key)
            self._log.info("%s: %s not supported; left out", self._prefix, what)

    def failed(self, key: Hashable, what: str, error: object, now_ns: int) -> float:
        """A transient failure of ``key``: left out until the backoff delay has passed.

        Returns:
            The delay before the next try, seconds.
        """
        n = self._failing.get(key, (0, 0))[0]
        delay = backoff_delay(n, base_s=self._base_s, cap_s=self._cap_s, rand=lambda: 1.0)
        self._failing[key] = (n + 1, now_ns + int(delay * 1e9))
        if key not in self._logged:
            self._logged.add(key)
            self._log.warning("%s: %s failed (%s); left out, retried with backoff",
                              self._prefix, what, error)
        return delay

    def ok(self, key: Hashable, what: str) -> None:
        """``key`` answered: forget its failures (one line when it had failed)."""
        if self._failing.pop(key, None) is not None:
            self._log.info("%s: %s answers again", self._prefix, what)
            self._logged.discard(key)

    def failures(self, key: Hashable) -> int:
        """Failures in a row of ``key`` (0 when it last answered)."""
        return self._failing.get(key, (0, 0))[0]
