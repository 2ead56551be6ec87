"""asv benchmarks of bk-bench. Every benchmark process times on one torch thread (two threads
on two cores were ~10x noisier) with freed memory kept by the allocator
(``bench.measure.keep_freed_memory``)."""

import torch

from bench import measure

torch.set_num_threads(1)
# asv imports this package from the working tree and ``bench`` from the commit measured; a
# commit from before the allocator policy is measured with the C library's default.
if hasattr(measure, "keep_freed_memory"):
    measure.keep_freed_memory()
