from bench.registry import Knob, Technique, register
from bk.adaptive.early_exit import EarlyExitLanguageModel

register(Technique(
    name="early_exit",
    summary="Early exit: a token leaves after the first layer whose exit head (shared LM head, "
            "per-layer norm) is confident enough; its later per-token work is skipped.",
    build=lambda config, knobs: EarlyExitLanguageModel(
        config, exit_threshold=float(knobs["exit_threshold"]),
        min_exit_layer=int(knobs["min_exit_layer"])),
    knobs=(
        Knob("exit_threshold", 0.9, grid=(0.7, 0.8, 0.9, 0.95), low=0.5, high=0.99,
             help="exit when the max softmax probability of a layer's prediction reaches this"),
        Knob("min_exit_layer", 1, grid=(1, 2),
             help="earliest layer after which a token may exit (at most n_layers)"),
    ),
    finetune_fraction=0.3,
))
