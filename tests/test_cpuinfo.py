"""rdm.cpuinfo: the one /proc/cpuinfo reader (model name for reports, flags for bf16 auto)."""

import pytest

import rdm.cpuinfo
from rdm.evaluation.report import machine
from rdm.train import _cpu_flags

# two cores of an x86 machine, as /proc/cpuinfo lists them (abridged); "vmx flags" must not be
# taken for "flags"
CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8480+
vmx flags\t: vnmi invvpid
flags\t\t: fpu avx2 avx512f amx_bf16

processor\t: 1
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu avx2 avx512f amx_bf16
"""


@pytest.fixture
def fake_cpuinfo(tmp_path, monkeypatch):
    path = tmp_path / "cpuinfo"
    monkeypatch.setattr(rdm.cpuinfo, "CPUINFO", path)
    return path


def test_fields_of_the_first_core(fake_cpuinfo):
    fake_cpuinfo.write_text(CPUINFO)
    assert rdm.cpuinfo.cpuinfo_field("model name") == "Intel(R) Xeon(R) Platinum 8480+"
    assert rdm.cpuinfo.cpuinfo_field("flags") == "fpu avx2 avx512f amx_bf16"
    assert rdm.cpuinfo.cpuinfo_field("microcode") is None
    assert _cpu_flags() == {"fpu", "avx2", "avx512f", "amx_bf16"}
    assert machine()["cpu"] == "Intel(R) Xeon(R) Platinum 8480+"


def test_no_cpuinfo_file(fake_cpuinfo):
    # not Linux: no flags (so no bf16 by default), the CPU named by platform instead
    assert rdm.cpuinfo.cpuinfo_field("flags") is None
    assert _cpu_flags() == set()
    assert machine()["cpu"]
