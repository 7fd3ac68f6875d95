"""Inductor's per-process set-up work, run beside the trainer's set-up instead of inside its first step.

The first torch.compile'd call of a process on CPU makes inductor do two things that do not depend on
what is compiled, every process again, even when every compiled artifact comes from its on-disk cache:
- find the widest vector instruction set (AVX512, AVX2, ...) that its C++ compiler can build for and
  this machine can load: it builds a probe library (cached on disk) and dlopens it in a child Python
  process. That child held the first training step of configs/recflow-2stage.toml for 0.57 of its
  3.15 s (cProfile, warm cache, CPU);
- hash the source of every torch module (torch_key, part of every cache key): 0.18 s alone, 0.28 s of
  a first step's compile under cProfile;
- before loading its first C++ kernel, even one cached on disk, run the C++ preprocessor over the
  kernels' common header (cpp_prefix.h) and hash the output, to key the precompiled header: 0.21 s of
  the first training step of configs/recflow-2stage.toml (cProfile, warm cache, CPU).
All three answers are cached in the process, so computing them on threads while the main thread reads
the data, plans the tables and builds the model takes them off the step's path; the threads mostly wait
on child processes and on file reads, on a core the set-up leaves idle.
"""

from __future__ import annotations

import threading

WARM_UP_KERNEL = 'extern "C" void kernel(float* out) { out[0] = 0.0f; }'
"""A C++ kernel loaded the way inductor loads every CPU kernel it generates, so that the precompiled
header it keys (by header and command line, which do not depend on the kernel) is the one theirs use."""


def _prepare_cpp_kernels() -> None:
    """Pick the vector ISA (a child process), then load WARM_UP_KERNEL: it keys the precompiled header in
    this process (the preprocessor run) and builds it on first use of the on-disk cache."""
    from torch._inductor import codecache, cpu_vec_isa

    cpu_vec_isa.pick_vec_isa()
    codecache.CppPythonBindingsCodeCache.load_pybinding(["float*"], WARM_UP_KERNEL)


def prepare_inductor_in_background() -> threading.Thread:
    """Start inductor's vector-ISA check and its precompiled-header key on a daemon thread, and its
    source hash (torch._inductor.codecache.torch_key) on torch's own prefetch thread.

    A compile that starts before they are done does the same work itself, as it would without this, and
    waits for the hash: the results are the same, only the time saved is lost.

    Returns:
        The thread of the ISA check and the header.
    """
    from torch._inductor import codecache  # imported on the calling thread; the threads only compute

    thread = threading.Thread(target=_prepare_cpp_kernels, name="inductor-cpp-set-up", daemon=True)
    thread.start()
    codecache.torch_key.prefetch()
    return thread
