from bench.registry import Technique, register
from bk.adaptive.multiscale import MultiScaleLanguageModel

register(Technique(
    name="multiscale",
    summary="Hourglass of resolutions: inner blocks run on causally pooled sequences "
            "(N -> N/k -> N/k^2 ... -> N) with learned pooling and a full-resolution residual.",
    model=MultiScaleLanguageModel,
    finetune_fraction=0.3,
))
