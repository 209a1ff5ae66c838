"""The TSC rate on the kernel command line (images/hosttsc.py)."""

from __future__ import annotations

import pytest

from images.hosttsc import tsc_khz_from_cpuinfo, with_tsc_khz

CPUINFO = """\
processor\t: 0
model name\t: AMD EPYC
cpu MHz\t\t: 2596.106
bogomips\t: 5192.21
flags\t\t: fpu tsc constant_tsc

processor\t: 1
bogomips\t: 5192.21
"""


def test_rate_is_bogomips_times_500() -> None:
    assert tsc_khz_from_cpuinfo(CPUINFO) == 2_596_105


@pytest.mark.parametrize(
    "text",
    [
        "",
        "processor : 0\nBogoMIPS : 48.00\n",  # an arm64 timer rate, not a TSC
        "bogomips : lots\n",
        "bogomips : 1e9\n",
        "bogomips : -5192.21\n",
    ],
)
def test_no_or_implausible_rate_gives_none(text: str) -> None:
    assert tsc_khz_from_cpuinfo(text) is None


def test_param_is_appended_replaced_and_removed() -> None:
    base = "console=ttyS0 quiet"
    assert with_tsc_khz(base, 2_000_000) == "console=ttyS0 quiet tsc_early_khz=2000000"
    again = with_tsc_khz("tsc_early_khz=1 console=ttyS0 quiet", 3_000_000)
    assert again == "console=ttyS0 quiet tsc_early_khz=3000000"
    assert with_tsc_khz("console=ttyS0 tsc_early_khz=5 quiet", None) == base


@pytest.mark.parametrize("khz", [0, -1, 99_999, 10_000_001])
def test_implausible_rate_is_refused(khz: int) -> None:
    with pytest.raises(ValueError):
        with_tsc_khz("console=ttyS0", khz)
