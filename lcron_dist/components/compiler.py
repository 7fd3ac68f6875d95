"""Inductor's per-process set-up work, run beside the trainer's set-up instead of inside its first step.

The first torch.compile'd call of a process on CPU makes inductor do two things that do not depend on
what is compiled, every process again, even when every compiled artifact comes from its on-disk cache:
- find the widest vector instruction set (AVX512, AVX2, ...) that its C++ compiler can build for and
  this machine can load: it builds a probe library (cached on disk) and dlopens it in a child Python
  process. That child held the first training step of configs/recflow-2stage.toml for 0.57 of its
  3.15 s (cProfile, warm cache, CPU);
- hash the source of every torch module (torch_key, part of every cache key): 0.18 s alone, 0.28 s of
  a first step's compile under cProfile.
Both answers are cached in the process, so computing them on threads while the main thread reads the
data, plans the tables and builds the model takes them off the step's path; the threads mostly wait on
the child and on file reads, on a core the set-up leaves idle.
"""

from __future__ import annotations

import threading


def prepare_inductor_in_background() -> threading.Thread:
    """Start inductor's vector-ISA check (torch._inductor.cpu_vec_isa.pick_vec_isa) on a daemon thread,
    and its source hash (torch._inductor.codecache.torch_key) on torch's own prefetch thread.

    A compile that starts before they are done runs the same ISA check itself, as it would without this,
    and waits for the hash: the results are the same, only the time saved is lost.

    Returns:
        The ISA check's thread.
    """
    from torch._inductor import codecache, cpu_vec_isa  # imported on the calling thread; the threads only compute

    thread = threading.Thread(target=cpu_vec_isa.pick_vec_isa, name="inductor-vec-isa-probe", daemon=True)
    thread.start()
    codecache.torch_key.prefetch()
    return thread
