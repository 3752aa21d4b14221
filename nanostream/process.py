"""Process-wide settings, made by the entry points (the CLI, job workers, the app), never on
import: code that imports the engine as a library keeps the interpreter's defaults."""

from __future__ import annotations

import atexit
import ctypes
import gc


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


def skip_collection_at_exit() -> None:
    """Exit without the interpreter's last garbage collections: the OS frees the memory anyway,
    and with torch and timm imported those collections cost ~1.4 s of CPU at every exit
    (`python -c "import timm"`: 8.8 s against 7.4 s with this). atexit handlers still run, and
    files are still flushed and closed. Calling it again changes nothing (app.py runs per page)."""
    atexit.unregister(gc.freeze)
    atexit.register(gc.freeze)  # objects frozen are skipped by every later collection
