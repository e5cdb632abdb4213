"""Moving the process's large, filled anonymous memory onto 2 MiB pages (Linux's ``MADV_COLLAPSE``).

A decoding step reads every weight of the model once, front to back. Through 4 KiB pages that is a page-table
walk for every 4 KiB the processor's TLB cannot hold (SmolLM2's 540 MB of packed fp32 weights: 130k a step);
through 2 MiB pages, 512 times fewer. On a 2-core AMD EPYC the 120 packed products of a 16-row SmolLM2 step took
38-40 ms on huge pages against 42-45 ms without, and the server's whole step 81-83 ms against 84-86 ms (the
fastest of each process's runs, in two and three processes).

``collapse()`` asks the kernel to move every region that is anonymous (the heap included: glibc serves the
packed pieces from it), writable, at least one huge page long and mostly resident (``FILLED``: an untouched
reservation such as a thread's stack would be filled with zeros) onto huge pages, now, in place: the contents
are unchanged. Linux 6.1 or newer with transparent huge pages not ``never``; elsewhere it does nothing. It takes
about 1-3 s for a GB, so it is for a process that keeps its weights: a server after packing them.

    regions = collapsible(open("/proc/self/smaps").read())   # pure: [(start, end)], aligned inwards to 2 MiB
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

HUGE_PAGE = 2 << 20
MADV_COLLAPSE = 25  # <linux/mman.h>, Linux 6.1
FILLED = 0.9  # the resident share of a region below which it is left alone


def collapsible(smaps: str) -> list[tuple[int, int]]:
    """The ranges of ``/proc/<pid>/smaps`` text to collapse: each writable anonymous region (no file; the heap
    counts) at least ``FILLED`` resident, shrunk inwards to whole huge pages, where one remains."""
    regions: list[list] = []  # [start, end, anonymous and writable, resident bytes]
    for line in smaps.splitlines():
        fields = line.split()
        if not fields:
            continue
        if "-" in fields[0] and not fields[0].endswith(":"):  # a region's header: range perms offset dev inode [path]
            start, end = (int(part, 16) for part in fields[0].split("-"))
            path = fields[5] if len(fields) > 5 else ""
            regions.append([start, end, "w" in fields[1] and path in ("", "[heap]"), 0])
        elif fields[0] == "Rss:" and regions:
            regions[-1][3] = int(fields[1]) << 10
    ranges = []
    for start, end, eligible, resident in regions:
        first, last = -(-start // HUGE_PAGE) * HUGE_PAGE, end // HUGE_PAGE * HUGE_PAGE
        if eligible and last > first and resident >= FILLED * (end - start):
            ranges.append((first, last))
    return ranges


def collapse() -> int:
    """Collapse this process's ``collapsible`` memory onto huge pages; the bytes the kernel collapsed (0 where
    it cannot: not Linux, an older kernel, huge pages off)."""
    if not sys.platform.startswith("linux"):
        return 0
    try:
        with open("/proc/self/smaps") as file:
            ranges = collapsible(file.read())
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    except OSError:
        return 0
    madvise = libc.madvise
    madvise.argtypes, madvise.restype = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_int
    return sum(end - start for start, end in ranges if madvise(start, end - start, MADV_COLLAPSE) == 0)
