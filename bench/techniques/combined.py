from bench.registry import Technique, register
from bk.adaptive.combined import CombinedLanguageModel

register(Technique(
    name="combined",
    summary="The stack of techniques that cut work on independent axes: the multi-scale "
            "hourglass, with learned per-position sparsity in every block at its resolution.",
    model=CombinedLanguageModel,
    finetune_fraction=0.3,
))
