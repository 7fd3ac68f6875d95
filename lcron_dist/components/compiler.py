"""Inductor's check of the CPU compiler, run beside the trainer's set-up instead of inside its first step.

The first torch.compile'd call of a process on CPU makes inductor find the widest vector instruction
set (AVX512, AVX2, ...) that its C++ compiler can build for and this machine can load: it builds a
probe library (cached on disk) and dlopens it in a child Python process, every process again, even
when every compiled artifact comes from inductor's on-disk cache. That child held the first training
step of configs/recflow-2stage.toml for 0.57 of its 3.15 s (cProfile, warm cache, CPU). The answer is
cached in the process (functools.cache), so asking for it on a thread while the main thread reads
the data, plans the tables and builds the model takes the child off the step's path; the thread
mostly waits on the child, which runs on a core the set-up leaves idle.
"""

from __future__ import annotations

import threading


def probe_vector_isa_in_background() -> threading.Thread:
    """Start inductor's vector-ISA check (torch._inductor.cpu_vec_isa.pick_vec_isa) on a daemon thread.

    A compile that starts before the thread is done runs the same check itself, as it would without
    this thread: the result is the same, only the time saved is lost.
    """
    from torch._inductor import cpu_vec_isa  # imported on the calling thread; the thread only runs the check

    thread = threading.Thread(target=cpu_vec_isa.pick_vec_isa, name="inductor-vec-isa-probe", daemon=True)
    thread.start()
    return thread
