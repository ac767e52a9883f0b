"""What /proc/cpuinfo says of this CPU: one reader for the doctor, the speed report and the CPU-dependent choices
(e.g. the Linear layers' bias form, dinat_m2f/modeling/linear.py)."""

from __future__ import annotations

import functools


@functools.cache
def _first_processor() -> dict[str, str]:
    """The fields of the first processor in /proc/cpuinfo ({} where there is none, e.g. not Linux)."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as cpuinfo:
            for line in cpuinfo:
                if not line.strip():
                    if fields:
                        break  # the first processor's block has ended
                    continue
                key, sep, value = line.partition(":")
                if sep:
                    fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return fields


def cpuinfo_field(name: str) -> str:
    """A /proc/cpuinfo field of the first processor ("model name", "vendor_id", "flags", ...), "" where unknown."""
    return _first_processor().get(name, "")


def cpu_vendor() -> str:
    """This x86 CPU's vendor string ("GenuineIntel", "AuthenticAMD"), "" where unknown."""
    return cpuinfo_field("vendor_id")


def cpu_flags() -> set[str]:
    """The CPU's feature flags ("avx2", "avx512f", ...), empty where unknown."""
    return set(cpuinfo_field("flags").split())
