"""How many CPU threads a CPU run of the embedded tiny models uses.

A 420k-parameter model gains little from intra-op parallelism, while torch's worker threads spin and fight for cores
when the machine is shared. Measured with the default FlowRL math recipe on a 2-core machine (seconds per step, two
threads / one thread): quiet 0.60 / 0.83, beside one busy process 7.16 / 0.87, beside two 1.86 / 1.30. So the
embedded runs (recipes with no model, the evaluation of the built-in tasks, the benchmarks) use one thread unless told
otherwise; a one-thread run never takes more than its share of a busy machine. An explicit choice always wins: a
command-line flag first, then `OMP_NUM_THREADS`.

Not handled: real models (a path or hub id) and GPU runs keep torch's own default; nothing here looks at the load.
"""

import os


def cpu_threads(requested: int | None = None) -> int:
    """The thread count for a CPU run of an embedded model: `requested` (a flag), else `OMP_NUM_THREADS`, else 1."""
    if requested is not None:
        if requested < 1:
            raise ValueError(f"The number of CPU threads must be at least 1, got {requested}.")
        return requested
    value = os.environ.get("OMP_NUM_THREADS", "").strip()
    if value:
        try:
            threads = int(value)
        except ValueError:
            raise ValueError(f"OMP_NUM_THREADS must be a positive integer, got {value!r}.") from None
        if threads >= 1:
            return threads
    return 1


def use_cpu_threads(requested: int | None = None) -> int:
    """Set torch's intra-op thread count to `cpu_threads(requested)` and return it."""
    import torch

    threads = cpu_threads(requested)
    torch.set_num_threads(threads)
    return threads
