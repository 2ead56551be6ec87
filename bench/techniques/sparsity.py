from bench.registry import Knob, Technique, register
from bk.adaptive.sparsity import SparseLanguageModel

register(Technique(
    name="sparsity",
    summary="Learned per-position sparsity: a predictor per block skips the MoE feed-forward "
            "and potential projection (filled with 0 and a causal carry); the BK recurrence "
            "still visits every position.",
    build=lambda config, knobs: SparseLanguageModel(
        config, target_sparsity=float(knobs["target_sparsity"]),
        sparsity_weight=float(knobs["sparsity_weight"])),
    knobs=(
        Knob("target_sparsity", 0.5, grid=(0.25, 0.5, 0.75), low=0.05, high=0.95,
             help="fraction of (position, layer) pairs to skip"),
        Knob("sparsity_weight", 1.0, grid=(0.3, 1.0, 3.0), low=0.1, high=10.0, log=True,
             help="weight of the squared deviation from the target sparsity in the loss"),
    ),
    finetune_fraction=0.3,
    schedule=lambda model, progress: model.schedule(progress),
))
