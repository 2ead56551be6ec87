from bench.registry import Technique, register
from bk.model import LanguageModel

register(Technique(
    name="dense",
    summary="The dense ResNet-BK baseline: every token runs every layer.",
    build=lambda config, knobs: LanguageModel(config),
    finetune_fraction=0.0,
))
