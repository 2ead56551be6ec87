from bench.registry import Knob, Technique, register
from bk.adaptive.combined import CombinedLanguageModel

register(Technique(
    name="combined",
    summary="The stack of techniques that cut work on independent axes: the multi-scale "
            "hourglass, with learned per-position sparsity in every block at its resolution.",
    build=lambda config, knobs: CombinedLanguageModel(
        config, factor=int(knobs["factor"]), levels=int(knobs["levels"]),
        target_sparsity=float(knobs["target_sparsity"]),
        sparsity_weight=float(knobs["sparsity_weight"])),
    knobs=(
        Knob("factor", 2, grid=(2, 4), low=2, high=8, help="hourglass pooling factor"),
        Knob("levels", 2, grid=(1, 2), low=1, high=2, help="hourglass down-sampling levels"),
        Knob("target_sparsity", 0.1, grid=(0.0, 0.1, 0.25), low=0.0, high=0.9,
             help="fraction of each block's positions whose per-position work is skipped"),
        Knob("sparsity_weight", 1.0, grid=(1.0,), low=0.1, high=10.0, log=True,
             help="weight of the squared deviation from the target sparsity"),
    ),
    finetune_fraction=0.3,
    schedule=lambda model, progress: model.schedule(progress),
))
