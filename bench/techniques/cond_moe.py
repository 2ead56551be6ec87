from bench.registry import Technique, register
from bk.adaptive.conditional_moe import ConditionalMoELanguageModel

register(Technique(
    name="cond_moe",
    summary="Conditional MoE: a learned difficulty predictor picks k in [k_min, k_max] experts "
            "per token (straight-through Gumbel-softmax, cost penalty on expected k).",
    model=ConditionalMoELanguageModel,
    finetune_fraction=0.3,
))
