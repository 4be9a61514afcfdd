"""glibc's malloc, tuned for CPU training through `mallopt` and `malloc_trim` (ctypes; a no-op off glibc).

Checked against glibc 2.36 (Debian 12); M_MMAP_THRESHOLD is -3 in every glibc's malloc.h.
"""

import ctypes
import platform

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number (malloc.h)
INITIAL_MMAP_THRESHOLD = 128 * 1024


def glibc() -> ctypes.CDLL | None:
    """This process's C library if it is glibc, whose malloc the two functions below tune; else None."""
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        return ctypes.CDLL("libc.so.6")
    return None


def pin_malloc_mmap_threshold() -> None:
    """Keep glibc's mmap threshold at its initial 128 KiB so that large freed buffers go back to the OS at once.

    After the first large free glibc raises the threshold (up to 32 MiB) and from then on serves the temporaries
    of a CPU training step (activations; in QLoRA every quantized weight, dequantized in every matmul) from its
    heap, where the small long-lived tensors allocated between them pin the freed pages: for a TinyLlama-sized
    nf4 base, load + one training step peaks at about twice the memory (bench/qlora_memory.py). The price is a
    page fault per page of each large allocation. A no-op off glibc.
    """
    if (libc := glibc()) is not None:
        libc.mallopt(M_MMAP_THRESHOLD, INITIAL_MMAP_THRESHOLD)


def trim_malloc_heap() -> None:
    """Hand the free pages that glibc keeps inside its heap back to the OS (a no-op off glibc)."""
    if (libc := glibc()) is not None:
        libc.malloc_trim(0)
