"""Device groups: one regex over the device id names a device's group (alert routing, drift)."""

from __future__ import annotations

import re
from collections.abc import Callable

DEFAULT_GROUP = "default"


def device_grouper(pattern: str) -> Callable[[str], str]:
    """``device_id -> group``: the regex's named group ``group``, else its first group, else the whole
    match; ``DEFAULT_GROUP`` when the pattern is empty or does not match."""
    if not pattern:
        return lambda device_id: DEFAULT_GROUP
    rx = re.compile(pattern)

    def group_of(device_id: str) -> str:
        m = rx.search(device_id)
        if m is None:
            return DEFAULT_GROUP
        if "group" in rx.groupindex:
            value = m.group("group")
        elif rx.groups:
            value = m.group(1)
        else:
            value = m.group(0)
        return value or DEFAULT_GROUP

    return group_of
