"""The trainer's background check of inductor's vector instruction set (components/compiler.py)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import subprocess
    import sys
    from torch._inductor import cpu_vec_isa
    from lcron_dist.components.compiler import probe_vector_isa_in_background

    run, children = subprocess.run, []
    def counted(*args, **kwargs):
        children.append(args[0])
        return run(*args, **kwargs)
    subprocess.run = counted
    thread = probe_vector_isa_in_background()
    thread.join()
    assert thread.name == "inductor-vec-isa-probe"
    assert any(sys.executable in map(str, cmd) for cmd in children), children  # the dlopen probe

    def refuse(*args, **kwargs):
        raise AssertionError(f"the main thread probed again: {args[0]}")
    subprocess.run = refuse
    print("ISA", cpu_vec_isa.pick_vec_isa())
""")


def test_the_probe_runs_on_its_thread_and_the_main_thread_reuses_its_answer():
    """The thread dlopens inductor's probe library in a child Python; afterwards the main thread's check
    (what the first compiled call asks) starts no process at all."""
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "ISA " in out.stdout
