from bench.registry import Knob, Technique, register
from bk.adaptive.multiscale import MultiScaleLanguageModel

register(Technique(
    name="multiscale",
    summary="Hourglass of resolutions: inner blocks run on causally pooled sequences "
            "(N -> N/k -> N/k^2 ... -> N) with learned pooling and a full-resolution residual.",
    build=lambda config, knobs: MultiScaleLanguageModel(config, factor=int(knobs["factor"]),
                                                        levels=int(knobs["levels"])),
    knobs=(
        Knob("factor", 2, grid=(2, 4), low=2, high=8,
             help="pooling factor k between consecutive levels"),
        Knob("levels", 2, grid=(1, 2), low=1, high=2,
             help="number of down-sampling levels; needs n_layers >= levels + 2"),
    ),
    finetune_fraction=0.3,
))
