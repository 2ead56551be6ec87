from bench.registry import Technique, register
from bk.adaptive.sparsity import SparseLanguageModel

register(Technique(
    name="sparsity",
    summary="Learned per-position sparsity: a predictor per block skips the MoE feed-forward "
            "and potential projection (filled with 0 and a causal carry); the BK recurrence "
            "still visits every position.",
    model=SparseLanguageModel,
    finetune_fraction=0.3,
))
