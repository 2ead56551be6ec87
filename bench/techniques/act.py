from bench.registry import Knob, Technique, register
from bk.adaptive.act import ACTLanguageModel

register(Technique(
    name="act",
    summary="Adaptive Computation Time (Graves 2016): each token halts after a learned number "
            "of layers; halted tokens skip all later per-token work.",
    build=lambda config, knobs: ACTLanguageModel(config, threshold=float(knobs["act_threshold"]),
                                                 ponder_weight=float(knobs["act_lambda"])),
    knobs=(
        Knob("act_threshold", 0.99, grid=(0.5, 0.8, 0.9, 0.95, 0.99), low=0.5, high=0.999,
             help="halting threshold 1 - epsilon on the cumulative halting probability"),
        Knob("act_lambda", 0.01, grid=(0.001, 0.005, 0.01, 0.05, 0.1), low=1e-4, high=0.2,
             log=True, help="weight of the mean ponder cost N + R in the loss"),
    ),
    finetune_fraction=0.3,
))
