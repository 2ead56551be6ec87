from bench.registry import Technique, register
from bk.adaptive.seqlen import LengthAdaptiveModel

register(Technique(
    name="seqlen",
    summary="Learned sequence length: as it reads an input, a light predictor decides at each "
            "length bin whether to stop; the model runs on that prefix only, uncomputed "
            "positions get a unigram distribution.",
    model=LengthAdaptiveModel,
    finetune_fraction=0.3,
))
