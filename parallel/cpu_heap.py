"""The CPU heap of a training process: glibc's malloc settings, and a bound on what it keeps.

``training.cpu_heap`` (launcher/config.py) picks one of three on CPU:

- ``release``: blocks over 32 MB (the top of glibc's own adaptive mmap threshold, which
  plait fixes there) get their own mapping, returned when freed. Every such block a step
  allocates is faulted in and zeroed afresh by the kernel: at 16K tokens a 25M model's
  activations ([16384, 512] fp32) are such blocks, and transnormer-25m's step spends a
  third of its time in the kernel.
- ``keep``: no block gets its own mapping; freed blocks stay in the heap and the next step
  reuses their pages (the 16K step 0.81-0.86x of release's). What the heap holds beyond the
  live blocks (freed pages it keeps, and fragmentation) has no bound: h3-25m's 16K step
  outgrew a 24 GB machine under it, and the 1M-token CP=4 run no longer fit.
- ``bounded`` (the default): keep's settings, and ``HeapBound``: every 50 ms, when the
  process's resident memory exceeds the most live heap memory seen so far by more than
  10%, or the machine (or the job's cgroup) has less than 10% of its memory available, the
  heap is trimmed (glibc's ``malloc_trim``: the free pages inside it go back to the system;
  the next use faults them in again). A steady step keeps its pages (the high-water mark of
  live memory covers them) and so keep's speed; growth past the bound, and pages the
  machine needs, go back within the interval.

Measured side by side: docs/benchmarks.md "The CPU heap at 16K" (benchmarks/cpu_heap.py).
PyTorch's CPU tuning guides get keep's effect from jemalloc or tcmalloc, which would be a
preloaded library the project cannot install from PyPI; this needs none. Nothing changes on
CUDA, off glibc, or where the user set glibc's own variables (``GLIBC_MALLOC_ENV``).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import threading
from typing import Literal

CpuHeap = Literal["bounded", "keep", "release"]

GLIBC_MALLOC_ENV = (
    "MALLOC_MMAP_MAX_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_",
    "MALLOC_ARENA_MAX", "GLIBC_TUNABLES",
)
"""glibc's own malloc settings: where any is set, the user has chosen, and plait leaves it."""


def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if not name or os.name != "posix":
        return None
    try:
        return ctypes.CDLL(name)
    except OSError:
        return None


def tune_cpu_allocator(keep_large: bool = False) -> bool:
    """glibc's settings for a training process: freed blocks stay in the process.

    glibc serves allocations above its mmap threshold (128 KB, adapting upwards to at most
    32 MB) with fresh mmaps and trims the heap eagerly, so every new activation-sized CPU
    tensor pays page faults and the kernel's zeroing of the pages. The threshold goes to its
    maximum and the heap is trimmed only past 1 GB: lightning attention's forward+backward
    at 16K tokens 17.7 -> 14.2 us/token (benchmarks/kernels.py). ``keep_large``: mmap off
    altogether (M_MMAP_MAX 0: every block from the heap, which keeps what is freed), for
    ``keep`` and ``bounded`` (the module docstring).

    Left alone where the user set glibc's own variables (``GLIBC_MALLOC_ENV``). Returns
    whether the settings were applied (False off glibc or when left alone).
    """
    if any(k in os.environ for k in GLIBC_MALLOC_ENV):
        return False
    libc = _libc()
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is None:
        return False
    M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -2, -3, -4
    ok = mallopt(M_MMAP_THRESHOLD, 32 << 20)  # the top of glibc's adaptive threshold
    # keep_large: none above it either, no block gets its own mmap (65536: glibc's default)
    ok &= mallopt(M_MMAP_MAX, 0 if keep_large else 65536)
    ok &= mallopt(M_TRIM_THRESHOLD, 1 << 30)
    ok &= mallopt(M_TOP_PAD, 64 << 20)
    return bool(ok)


def _cgroup_memory() -> str | None:
    """This process's cgroup v2 directory where it has a memory limit (a Slurm job's),
    else None."""
    try:
        with open("/proc/self/cgroup") as f:
            path = next((ln.split("::", 1)[1].strip() for ln in f if ln.startswith("0::")), None)
    except OSError:
        return None
    if path is None:
        return None
    d = "/sys/fs/cgroup" + path.rstrip("/")
    try:
        with open(d + "/memory.max") as f:
            return d if f.read().strip() != "max" else None
    except OSError:
        return None


def _cgroup_read(d: str) -> tuple[int | None, int]:
    try:
        with open(d + "/memory.max") as f:
            raw = f.read().strip()
        with open(d + "/memory.current") as f:
            used = int(f.read())
    except (OSError, ValueError):
        return None, 0
    return (None if raw == "max" else int(raw)), used


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(f, ctypes.c_size_t) for f in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]


class HeapBound:
    """Trim the heap when it holds more than a run needs, or than the machine can spare.

    At each ``check``, two tests; either trims (glibc's ``malloc_trim``: the free pages
    inside the heap go back to the system, and the next use faults them in again):

    - the heap outgrew the live blocks: resident set - ``base`` > (1 + ``fraction``) x
      peak live + ``slack``, where live is what malloc has handed out and not had back
      (mallinfo2's uordblks + hblkhd, every arena), peak live its maximum over the checks,
      and ``base`` the anonymous resident memory outside malloc's heap (the interpreter's own
      arenas, libraries' data) when the bound started, raised by what a trim could not
      return. File-backed pages (a memory-mapped data shard) are not counted. Between steps
      live memory falls but the resident set need not: the pages kept for the next step are
      under the peak, so a steady run is not trimmed, and fragmentation past the fraction
      is.
    - the machine runs short: available memory (MemAvailable, or the cgroup's limit less its
      use, whichever is less: a Slurm job's share) under ``reserve`` of the total. Live
      memory counts blocks whose pages are not yet touched, which glibc's mmap would not
      have made resident; where several ranks share a node near its limit (the 1M-token
      CP=4 run: 4 x 5 GiB of 24), the first test alone let them outgrow it. This one makes
      the kept pages a cache the machine takes back before it runs out.

    ``start`` checks from a daemon thread every ``interval`` seconds, whatever the process
    is doing (a block's forward, its backward's recompute, an evaluation, a save): growth is
    caught within that interval, and the model is not touched. A check reads /proc/self/statm
    and /proc/meminfo and walks the arenas' free lists (tens of microseconds, the GIL released
    in the C calls); glibc's malloc is thread-safe and fork-safe, so trimming beside the
    training thread is too."""

    def __init__(self, libc: ctypes.CDLL, fraction: float = 0.10, slack: int = 256 << 20,
                 reserve: float = 0.10):
        self._libc = libc
        self.reserve = reserve
        self._cgroup = _cgroup_memory()
        self._mallinfo2 = libc.mallinfo2
        self._mallinfo2.restype = _Mallinfo2
        self._page = os.sysconf("SC_PAGE_SIZE")
        self.fraction, self.slack = fraction, slack
        self.peak_live = 0
        self.trims = 0
        """How many times the heap was trimmed (the tests and benchmarks/cpu_heap.py read it)."""
        self.base = self.resident() - self.live()
        self._stop: threading.Event | None = None

    @classmethod
    def create(cls, **kw) -> HeapBound | None:
        """The bound, or None where glibc lacks mallinfo2 (< 2.33) or malloc_trim."""
        libc = _libc()
        if libc is None or not all(hasattr(libc, f) for f in ("mallinfo2", "malloc_trim")):
            return None
        return cls(libc, **kw)

    def resident(self) -> int:
        """Anonymous resident memory: the resident set less its file-backed and shared pages
        (statm's third field), which the heap does not hold: a memory-mapped data shard's
        pages read into the page cache must not count as the heap's growth."""
        with open("/proc/self/statm", "rb") as f:
            fields = f.read().split()
        return (int(fields[1]) - int(fields[2])) * self._page

    def live(self) -> int:
        m = self._mallinfo2()
        return m.uordblks + m.hblkhd

    def available(self) -> tuple[int, int]:
        """(available, total) bytes: the machine's, or its cgroup's where that is tighter."""
        info = {}
        with open("/proc/meminfo", "rb") as f:
            for line in f:
                key, _, rest = line.partition(b":")
                if key in (b"MemAvailable", b"MemTotal"):
                    info[key] = int(rest.split()[0]) << 10
        avail, total = info.get(b"MemAvailable", 0), info.get(b"MemTotal", 0)
        if self._cgroup is not None:
            limit, used = _cgroup_read(self._cgroup)
            if limit is not None and limit - used < avail:
                avail, total = limit - used, limit
        return avail, total

    def _excess(self) -> int:
        bound = (1 + self.fraction) * self.peak_live + self.slack
        return int(self.resident() - self.base - bound)

    def check(self) -> bool:
        """Trim if over either bound; whether it did."""
        self.peak_live = max(self.peak_live, self.live())
        grown = self._excess() > 0
        if not grown:
            avail, total = self.available()
            if avail >= self.reserve * total:
                return False
        self._libc.malloc_trim(0)
        self.trims += 1
        if grown and (left := self._excess()) > 0:
            # what a trim cannot return is not the heap's (the interpreter's own arenas, a
            # library's data): counted as outside it, so it does not trim again every check
            self.base += left
        return True

    def start(self, interval: float = 0.05) -> HeapBound:
        """Check every ``interval`` seconds from a daemon thread until ``stop``."""
        if self._stop is None:
            self._stop = stop = threading.Event()

            def watch():
                while not stop.wait(interval):
                    self.check()

            threading.Thread(target=watch, name="plait-heap-bound", daemon=True).start()
        return self

    def stop(self) -> None:
        if self._stop is not None:
            self._stop.set()
            self._stop = None


_BOUND: HeapBound | None = None
"""The process's bound: the heap is the process's, so one bound and one thread per process,
however many runs it starts (tests run several)."""


def apply(mode: CpuHeap) -> HeapBound | None:
    """The settings ``mode`` names for this process; the bound where it is ``bounded`` and
    the settings were applied (None otherwise, and a running bound is stopped)."""
    global _BOUND
    applied = tune_cpu_allocator(keep_large=mode != "release")
    if not (applied and mode == "bounded"):
        if _BOUND is not None:
            _BOUND.stop()
            _BOUND = None
        return None
    if _BOUND is None:
        _BOUND = HeapBound.create()
        if _BOUND is not None:
            _BOUND.start()
    return _BOUND
