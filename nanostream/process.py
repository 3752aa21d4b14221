"""Process-wide settings, made by the entry points that run networks (the CLI, job workers), never
on import: the Streamlit server and the tests import the engine without them."""

from __future__ import annotations

import ctypes


def keep_freed_memory() -> bool:
    """Ask glibc to serve large blocks from its heap and keep freed ones, instead of mapping fresh
    pages from the OS for every activation tensor and unmapping them again.

    A CPU forward pass allocates tens of MB of activations; by default each block above 128 KB
    (glibc's dynamic threshold tops out at 32 MB) is a new mmap whose every page faults on first
    touch: ~12,000 faults per efficientnet_lite1 pass of 8 images, 10-15% of its time. Freed
    blocks are reused instead of returned; a 1,000-image build still peaks at ~1.3 GB
    (bench/bench_train.py). False where it does not apply (not glibc).
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(libc.mallopt(m_mmap_threshold, 1 << 30) and libc.mallopt(m_trim_threshold, 1 << 30))
