"""Ceilings where skipping can pay: each technique's own skip path with its decisions given for
free (``TechniqueModel.forced``) at keep 0.5, timed against the dense model at the ``small`` and
``base`` scales (``bench.ceilings``: freshly initialised models, random tokens, no training).

The figure is ``t_forced / t_dense`` (lower is better, as asv reads every figure), timed
interleaved in one process on one thread. It tracks what each implementation could deliver
once its decisions were free; ``bk-bench run`` puts the trained technique's realised speedup
beside it. Not gated: ``.ci/gate`` selects ``track_.*time_ratio``, which
``track_ceiling_ratio`` does not match.
"""

import torch

from bench.ceilings import makes_decisions, pair, random_workload
from bench.registry import REFERENCE, techniques
from bench.rows import PATTERNS
from bk.model import ModelConfig
from bk.technique import Forcing

KEEP = 0.5
MEASURED_SCALES = ["small", "base"]
BATCHES, BATCH_SIZE, PASSES = 2, 16, 2  # under ~15 s per benchmark at base on this machine kind
VOCAB = 80
_PROBE = ModelConfig(vocab_size=VOCAB, d_model=8, n_layers=4, n_seq=16, n_experts=2, d_expert=8,
                     bk_channels=2)
NAMES = [name for name, t in techniques().items()
         if name != REFERENCE and makes_decisions(t.make(_PROBE))]
_MODELS: dict[tuple[str, str], tuple[torch.nn.Module, torch.nn.Module]] = {}


def models(scale: str, name: str) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The dense model and the technique's model holding its weights, built once per process."""
    if (scale, name) not in _MODELS:
        cfg = ModelConfig.at_scale(scale, vocab_size=VOCAB)
        _MODELS[(scale, name)] = pair(techniques()[name], cfg)
    return _MODELS[(scale, name)]


class Ceiling:
    params = (MEASURED_SCALES, NAMES, list(PATTERNS))
    param_names = ["scale", "technique", "pattern"]
    timeout = 300

    def setup(self, scale, name, pattern):
        self.dense, model = models(scale, name)
        self.forced = model.forced(Forcing(KEEP, pattern))
        self.workload = random_workload(self.dense.cfg, BATCHES, BATCH_SIZE)

    def track_ceiling_ratio(self, scale, name, pattern):
        speed = self.workload.paired(self.dense, self.forced, passes=PASSES)
        return 1 / speed.speedup

    track_ceiling_ratio.unit = "ratio"
