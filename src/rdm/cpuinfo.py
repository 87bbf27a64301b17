"""What ``/proc/cpuinfo`` says of this machine's CPU: its model name (in the reports beside the
figures) and its feature flags (``--mixed-precision auto`` picks bf16 only where they show
native bf16). Linux only; elsewhere every field is None."""

from __future__ import annotations

from pathlib import Path

CPUINFO = Path("/proc/cpuinfo")


def cpuinfo_field(name: str) -> str | None:
    """The value of the first ``name :`` line of /proc/cpuinfo (``"model name"``, ``"flags"``),
    or None where the file or the field does not exist. The first line is the first core's: on
    the machines rdm runs on every core reports the same model and flags."""
    try:
        text = CPUINFO.read_text()
    except OSError:
        return None
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() == name:
            return value.strip()
    return None
