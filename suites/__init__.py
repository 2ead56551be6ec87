"""asv benchmarks of bk-bench. Every benchmark process is set up as every bk-bench process that
times (``bench.measure.timing_process``: one torch thread, freed memory kept by the allocator)."""

import torch

from bench import measure

# asv imports this package from the working tree and ``bench`` from the commit measured; a
# commit from before ``timing_process`` is measured on one thread with the allocator's default.
getattr(measure, "timing_process", lambda: torch.set_num_threads(1))()
