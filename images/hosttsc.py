"""The kernel command line's clock settings, derived from the host's TSC rate.

Under TCG the guest's TSC *is* the host's TSC (QEMU returns host ticks for
``rdtsc``), but the guest kernel calibrates it against the emulated PIT with a
timing-sensitive loop.  On a loaded host that calibration fails, the kernel marks
the TSC unusable and then hangs waiting for timer ticks that never come (seen here:
every boot hung at load 3 on 2 cores).  Telling the kernel the rate
(``tsc_early_khz=``) skips the calibration, and ``tsc=reliable`` stops the clocksource
watchdog from discarding the TSC because the emulated timers lag behind it.

The host's rate is read from ``/proc/cpuinfo``: on x86 Linux ``bogomips`` is derived
from the calibrated TSC (loops_per_jiffy = tsc_khz * 1000 / HZ), so
``tsc_khz = bogomips * 500`` to within 5 kHz.  Pure functions; callers read the file.
"""

from __future__ import annotations

TSC_PARAM = "tsc_early_khz"


def tsc_khz_from_cpuinfo(cpuinfo: str) -> int | None:
    """The host TSC rate in kHz from ``/proc/cpuinfo`` text, or None if not x86-like."""
    for line in cpuinfo.splitlines():
        name, sep, value = line.partition(":")
        if sep and name.strip().lower() == "bogomips":
            try:
                khz = round(float(value.strip()) * 500)
            except ValueError:
                return None
            # Plausible TSC rates only: 100 MHz .. 10 GHz.
            return khz if 100_000 <= khz <= 10_000_000 else None
    return None


def with_tsc_khz(cmdline: str, khz: int | None) -> str:
    """``cmdline`` with ``tsc_early_khz=`` set to ``khz`` (replaced if present; removed if None)."""
    words = [w for w in cmdline.split() if not w.startswith(TSC_PARAM + "=")]
    if khz is not None:
        if not 100_000 <= khz <= 10_000_000:
            raise ValueError(f"implausible TSC rate {khz} kHz")
        words.append(f"{TSC_PARAM}={khz}")
    return " ".join(words)
