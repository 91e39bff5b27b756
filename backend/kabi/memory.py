"""Memory: mmap/mremap/madvise flags, /proc/PID/pagemap bits and PAGEMAP_SCAN, userfaultfd
(API, registration, write-protection, UFFDIO_COPY), and the CamelCase struct names
backend/memory.py uses."""

from __future__ import annotations

import ctypes

from .syscalls import _IOR, _IOWR, c_u64, iovec

# --------------------------------------------------------------------------------------------
# mmap, mremap, madvise (include/uapi/asm-generic/mman-common.h, mman.h, linux/mman.h)
# --------------------------------------------------------------------------------------------
PROT_READ, PROT_WRITE, PROT_EXEC = 1, 2, 4
MAP_SHARED, MAP_PRIVATE, MAP_FIXED, MAP_ANONYMOUS = 0x01, 0x02, 0x10, 0x20
MAP_GROWSDOWN, MAP_NORESERVE, MAP_FIXED_NOREPLACE = 0x100, 0x4000, 0x100000
MREMAP_MAYMOVE, MREMAP_FIXED = 1, 2
MADV_HUGEPAGE, MADV_NOHUGEPAGE = 14, 15
MADV_GUARD_INSTALL = 102                 # Linux 6.13
MADV_POPULATE_READ = 22                  # Linux 5.14
TASK_SIZE_X86_64 = (1 << 47) - 4096      # the highest user address + 1 (4-level paging)

# --------------------------------------------------------------------------------------------
# pagemap and PAGEMAP_SCAN (include/uapi/linux/fs.h, Linux 6.7+; absent from Debian 12 headers)
# --------------------------------------------------------------------------------------------
PM_PFN_MASK = (1 << 55) - 1
PM_SOFT_DIRTY = 1 << 55
PM_MMAP_EXCLUSIVE = 1 << 56
PM_UFFD_WP = 1 << 57
PM_GUARD_REGION = 1 << 58                # Linux 6.15: a guard marker, reported with PM_SWAP
PM_FILE = 1 << 61
PM_SWAP = 1 << 62
PM_PRESENT = 1 << 63

PAGE_IS_WPALLOWED = 1 << 0
PAGE_IS_WRITTEN = 1 << 1
PAGE_IS_FILE = 1 << 2
PAGE_IS_PRESENT = 1 << 3
PAGE_IS_SWAPPED = 1 << 4
PAGE_IS_PFNZERO = 1 << 5
PAGE_IS_HUGE = 1 << 6
PAGE_IS_SOFT_DIRTY = 1 << 7
PAGE_IS_GUARD = 1 << 8

PM_SCAN_WP_MATCHING = 1 << 0
PM_SCAN_CHECK_WPASYNC = 1 << 1


class page_region(ctypes.Structure):
    _fields_ = [("start", c_u64), ("end", c_u64), ("categories", c_u64)]


class pm_scan_arg(ctypes.Structure):
    _fields_ = [(n, c_u64) for n in (
        "size", "flags", "start", "end", "walk_end", "vec", "vec_len", "max_pages",
        "category_inverted", "category_mask", "category_anyof_mask", "return_mask")]


assert ctypes.sizeof(pm_scan_arg) == 96 and ctypes.sizeof(page_region) == 24
PAGEMAP_SCAN = _IOWR("f", 16, ctypes.sizeof(pm_scan_arg))

# --------------------------------------------------------------------------------------------
# userfaultfd (include/uapi/linux/userfaultfd.h)
# --------------------------------------------------------------------------------------------
UFFD_API = 0xAA
UFFD_USER_MODE_ONLY = 1
UFFD_FEATURE_WP_UNPOPULATED = 1 << 13
UFFD_FEATURE_WP_ASYNC = 1 << 15
UFFDIO_REGISTER_MODE_MISSING = 1 << 0
UFFDIO_REGISTER_MODE_WP = 1 << 1
UFFDIO_REGISTER_MODE_MINOR = 1 << 2
UFFDIO_WRITEPROTECT_MODE_WP = 1 << 0
UFFDIO_WRITEPROTECT_MODE_DONTWAKE = 1 << 1


class uffdio_api(ctypes.Structure):
    _fields_ = [("api", c_u64), ("features", c_u64), ("ioctls", c_u64)]


class uffdio_range(ctypes.Structure):
    _fields_ = [("start", c_u64), ("len", c_u64)]


class uffdio_register(ctypes.Structure):
    _fields_ = [("range", uffdio_range), ("mode", c_u64), ("ioctls", c_u64)]


class uffdio_writeprotect(ctypes.Structure):
    _fields_ = [("range", uffdio_range), ("mode", c_u64)]


UFFDIO_API = _IOWR(UFFD_API, 0x3F, ctypes.sizeof(uffdio_api))
UFFDIO_REGISTER = _IOWR(UFFD_API, 0x00, ctypes.sizeof(uffdio_register))
UFFDIO_UNREGISTER = _IOR(UFFD_API, 0x01, ctypes.sizeof(uffdio_range))
UFFDIO_WRITEPROTECT = _IOWR(UFFD_API, 0x06, ctypes.sizeof(uffdio_writeprotect))


class uffdio_copy(ctypes.Structure):
    _fields_ = [("dst", c_u64), ("src", c_u64), ("len", c_u64), ("mode", c_u64),
                ("copy", ctypes.c_int64)]


UFFDIO_COPY = _IOWR(UFFD_API, 0x03, ctypes.sizeof(uffdio_copy))
UFFDIO_COPY_MODE_DONTWAKE = 1 << 0

# --------------------------------------------------------------------------------------------
# backend/memory.py: CamelCase names it uses (same structs as above)
# --------------------------------------------------------------------------------------------
IOVec = iovec
PageRegion = page_region
PmScanArg = pm_scan_arg
