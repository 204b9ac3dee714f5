"""Process memory as a user sees it: the allocator setting that keeps it flat in depth, and its peaks.

Why an allocator setting: glibc's malloc raises its mmap threshold dynamically each time a large
block obtained by mmap is freed (up to 32 MiB on 64-bit). Memory-free backprop recomputes each layer's
activations and frees them again, layer after layer; after the first frees, those tensors come from the
heap instead of mmap, and the heap is fragmented and not returned. The process's peak then grows with
depth even though the tensors held at any moment do not (issue 15: +1,020 MB at 32 layers vs +218 MB
with a fixed threshold). Fixing the threshold (``mallopt(M_MMAP_THRESHOLD)``, which also turns off the
dynamic adjustment) puts every large tensor in its own mapping, returned to the system when freed.

``configure_allocator()`` does that through ctypes on glibc and nothing elsewhere. It respects the user:
it does nothing when ``REVLLM_ALLOCATOR_TUNING=0``, when any ``MALLOC_*`` tunable (or ``GLIBC_TUNABLES``)
is set in the environment, or when another allocator (jemalloc, tcmalloc, mimalloc) is preloaded.
This module is on the ground floor: it imports nothing from revllm.

The instruments live here too: ``rss_bytes`` / ``peak_rss_bytes`` / ``reset_peak_rss`` / ``vm_bytes`` (the
process), ``cpu_seconds`` (its CPU time), and ``SavedBytes`` (the bytes autograd keeps for backward).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import resource

import torch

OPT_OUT_ENV = "REVLLM_ALLOCATOR_TUNING"
# mallopt parameter numbers from glibc's <malloc.h>.
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
# 128 KiB is glibc's own starting threshold; fixing it there keeps every tensor of 128 KiB or more in its
# own mapping. Setting the trim threshold also fixes it (glibc raises it with the mmap threshold otherwise):
# free memory at the top of the heap beyond it goes back to the system.
MMAP_THRESHOLD = 128 * 1024
TRIM_THRESHOLD = 32 * 1024 * 1024
_OTHER_ALLOCATORS = ("jemalloc", "tcmalloc", "mimalloc")

_state: dict = {}


def _glibc():
    """The C library when it is glibc (gnu_get_libc_version exists), else None."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.gnu_get_libc_version.restype = ctypes.c_char_p
        libc.gnu_get_libc_version()
        return libc
    except (OSError, AttributeError):
        return None


def _user_setting(env) -> str | None:
    """Why the user's own choice wins, or None when there is none."""
    if env.get(OPT_OUT_ENV, "").strip().lower() in ("0", "off", "no", "false"):
        return f"{OPT_OUT_ENV}={env[OPT_OUT_ENV]}"
    own = sorted(k for k in env if k.startswith("MALLOC_") or k == "GLIBC_TUNABLES")
    if own:
        return f"{own[0]} is set"
    preload = env.get("LD_PRELOAD", "")
    for name in _OTHER_ALLOCATORS:
        if name in preload:
            return f"{name} is preloaded"
    return None


def configure_allocator(env=None) -> dict:
    """Fix glibc's mmap threshold (once per process); returns ``{"applied": bool, "reason": str}``."""
    if _state:
        return dict(_state)
    env = os.environ if env is None else env
    why = _user_setting(env)
    if why is not None:
        _state.update(applied=False, reason=f"left to the user ({why})")
        return dict(_state)
    libc = _glibc()
    if libc is None:
        _state.update(applied=False, reason="not glibc: the system allocator is left as it is")
        return dict(_state)
    ok = libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    _state.update(
        applied=bool(ok),
        reason=(
            f"glibc mallopt: mmap threshold {MMAP_THRESHOLD // 1024} KiB, trim threshold {TRIM_THRESHOLD // 2**20} MiB"
        )
        if ok
        else "mallopt refused",
    )
    return dict(_state)


def allocator_state() -> dict:
    """What ``configure_allocator`` did in this process (empty dict when it was not called)."""
    return dict(_state)


def rss_bytes() -> int:
    """Current resident set size of this process (Linux /proc)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    """The process's peak resident set size (VmHWM: since the start, or since ``reset_peak_rss``)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # never reset; KiB on Linux


def reset_peak_rss() -> bool:
    """Reset the peak to the current RSS (Linux >= 4.0: ``5`` into /proc/self/clear_refs), so that the
    peak of the work that follows is not the loading's; False where the system cannot."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_memory(device: str = "cpu") -> dict:
    """Whole-process peaks: CPU ``peak_rss_bytes``; CUDA adds torch's allocated and reserved peaks."""
    out = {"peak_rss_bytes": peak_rss_bytes()}
    if device == "cuda":
        out.update(
            cuda_max_allocated_bytes=torch.cuda.max_memory_allocated(),
            cuda_max_reserved_bytes=torch.cuda.max_memory_reserved(),
        )
    return out


def vm_bytes() -> int:
    """Current virtual memory size of this process (Linux /proc)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")


def cpu_seconds() -> float:
    """CPU time of this process (user + system): a load-independent cost measure on a shared machine."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def kernel_work() -> tuple[float, int]:
    """(system CPU seconds, minor page faults) of this process so far. An allocator that maps and unmaps
    large tensors pays for it here (each fresh page faulted in and zeroed by the kernel): a direct,
    less noisy measure of its cost than step wall time on a shared machine."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_stime, r.ru_minflt


class SavedBytes:
    """Bytes autograd keeps for backward, counted as unique storages seen by the pack hook.

    Parameters are excluded (they exist whether or not a backward follows). A memory-free stack is one
    ``autograd.Function``: what its ``save_for_backward`` keeps is exactly what is counted for it.
    Non-reentrant checkpointing saves its inputs through a Function too, so (b) is counted correctly.
    """

    def __init__(self, *models):
        # Weights are excluded by storage, not type (linear layers save views such as ``weight.t()``).
        # FSDP2 parameters are DTensors whose local shard owns the storage; the root's gathered copy that
        # FSDP2 keeps through the forward is counted, as it is held for the backward.
        self.exclude = {
            getattr(p, "_local_tensor", p).untyped_storage().data_ptr() for m in models for p in m.parameters()
        }
        self.storages: dict[int, int] = {}
        self.tensors = 0

    def _pack(self, t):
        s = t.untyped_storage()
        ptr = s.data_ptr()
        self.tensors += 1
        if ptr and ptr not in self.exclude:
            self.storages[ptr] = max(self.storages.get(ptr, 0), s.nbytes())
        return t

    @property
    def bytes(self) -> int:
        return sum(self.storages.values())

    def __enter__(self):
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        return self._ctx.__exit__(*exc)
