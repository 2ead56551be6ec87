from bench.registry import Technique, register
from bk.adaptive.early_exit import EarlyExitLanguageModel

register(Technique(
    name="early_exit",
    summary="Early exit: a token leaves after the first layer whose exit head (shared LM head, "
            "per-layer norm) is confident enough; its later per-token work is skipped.",
    model=EarlyExitLanguageModel,
    finetune_fraction=0.3,
))
