"""How the benches drive the engine: off the main thread, as the router's thread steps it for
generate() and the server.

OpenMP libraries run differently on the main thread (engine/cpu_gemm.py): there libgomp's workers keep
spinning for milliseconds after each of torch's parallel ops (a copy, a sum) and take a core from the
C++ kernels' own threads (a w8a8 decode step after a 50k-element copy: 5.7 ms -> 9.5 ms on 2 vCPUs),
which no user of the router sees.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor


def off_main_thread(steps):
    """steps() run in a thread other than the main one; its result."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="gpt2-engine-bench") as stepper:
        return stepper.submit(steps).result()
