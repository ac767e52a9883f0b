"""dinat_m2f.utils.cpu_info: the one /proc/cpuinfo reader."""

import os

import pytest

from dinat_m2f.utils import cpu_info

pytestmark = pytest.mark.skipif(not os.path.exists("/proc/cpuinfo"), reason="no /proc/cpuinfo (not Linux)")


def _first_block_fields() -> dict[str, str]:
    with open("/proc/cpuinfo") as f:
        block = f.read().split("\n\n")[0]
    return {k.strip(): v.strip() for k, sep, v in (line.partition(":") for line in block.splitlines()) if sep}


def test_fields_are_the_first_processors():
    want = _first_block_fields()
    assert want, "/proc/cpuinfo has no fields"
    for name, value in want.items():
        assert cpu_info.cpuinfo_field(name) == value
    assert cpu_info.cpuinfo_field("no such field") == ""


def test_vendor_and_flags():
    want = _first_block_fields()
    assert cpu_info.cpu_vendor() == want.get("vendor_id", "")
    assert cpu_info.cpu_flags() == set(want.get("flags", "").split())
    if cpu_info.cpu_vendor():  # x86: the flags the kernels' paths are chosen by are listed
        assert "sse2" in cpu_info.cpu_flags()
