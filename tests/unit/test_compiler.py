"""The trainer's background set-up of inductor: its vector instruction set check, its precompiled
header's key and its source hash (components/compiler.py)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import subprocess
    import sys
    import threading
    import torch
    from torch._inductor import codecache, config, cpu_vec_isa
    from lcron_dist.components.compiler import prepare_inductor_in_background

    hashing_threads, build_code_hash = [], codecache.build_code_hash
    def recorded(roots, prefix, hasher):
        if not prefix:  # the walk's top call
            hashing_threads.append(threading.current_thread().name)
        return build_code_hash(roots, prefix, hasher)
    codecache.build_code_hash = recorded

    run, children = subprocess.run, []
    def counted(*args, **kwargs):
        children.append(args[0])
        return run(*args, **kwargs)
    subprocess.run = counted
    thread = prepare_inductor_in_background()
    thread.join()
    assert thread.name == "inductor-cpp-set-up"
    assert any(sys.executable in map(str, cmd) for cmd in children), children  # the dlopen probe

    def refuse(*args, **kwargs):
        raise AssertionError(f"the main thread probed again: {args[0]}")
    subprocess.run = refuse
    print("ISA", cpu_vec_isa.pick_vec_isa())
    codecache.torch_key()  # what every compile's cache key asks: the prefetched hash, not a walk of its own
    assert len(hashing_threads) == 1 and hashing_threads[0] != threading.main_thread().name, hashing_threads

    # The header was keyed on the thread (one preprocessor run); a kernel compiled afterwards reuses it.
    assert config.cpp_cache_precompile_headers
    keyed = codecache._precompile_header.cache_info()
    assert keyed.misses == 1, f"the thread keyed no header: {keyed}"
    subprocess.run = run  # compiling a new kernel may run the C++ compiler
    torch.compile(lambda x: (x * 3).relu() + 1)(torch.randn(64))
    after = codecache._precompile_header.cache_info()
    assert after.misses == 1 and after.hits > keyed.hits, after
    print("HEADER", after)
""")


def test_the_probe_the_header_and_the_hash_run_on_threads_and_the_main_thread_reuses_their_answers():
    """The thread dlopens inductor's probe library in a child Python; afterwards the main thread's check
    (what the first compiled call asks) starts no process at all. The source hash is computed once, off
    the main thread. The precompiled header is keyed on the thread, and a kernel the main thread
    compiles afterwards finds that key instead of running the preprocessor again."""
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "ISA " in out.stdout and "HEADER " in out.stdout
