from bench.registry import Knob, Technique, register
from bk.adaptive.seqlen import LengthAdaptiveModel

register(Technique(
    name="seqlen",
    summary="Learned sequence length: a light predictor picks a length bin per input, the model "
            "runs on that prefix only, uncomputed positions get a unigram distribution.",
    build=lambda config, knobs: LengthAdaptiveModel(
        config, length_penalty=float(knobs["length_penalty"])),
    knobs=(
        Knob("length_penalty", 0.1, grid=(0.0, 0.05, 0.1, 0.2, 0.5), low=0.0, high=1.0,
             help="weight of the computed fraction L / n_seq in the predictor's objective"),
    ),
    finetune_fraction=0.3,
))
