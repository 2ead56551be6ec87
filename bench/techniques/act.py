from bench.registry import Technique, register
from bk.adaptive.act import ACTLanguageModel

register(Technique(
    name="act",
    summary="Adaptive Computation Time (Graves 2016): each token halts after a learned number "
            "of layers; halted tokens skip all later per-token work.",
    model=ACTLanguageModel,
    finetune_fraction=0.3,
))
