from bench.registry import Technique, register
from bk.adaptive.combined import CombinedLanguageModel

register(Technique(
    name="combined",
    summary="Every axis that cuts work, in one model: the hourglass (sequence), "
            "Mixture-of-Depths routing of the inner blocks (depth) and learned per-position "
            "sparsity in the blocks not routed (positions, off by default), each at its "
            "block's resolution.",
    model=CombinedLanguageModel,
    finetune_fraction=0.3,
))
