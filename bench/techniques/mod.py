from bench.registry import Technique, register
from bk.adaptive.depth import CapacityDepthModel

register(Technique(
    name="mod",
    summary="Mixture-of-Depths capacity routing (Raposo et al. 2024): in every other layer a "
            "router picks, causally, at most a capacity fraction of the tokens to run the "
            "block; the rest pass through, with static shapes.",
    model=CapacityDepthModel,
    finetune_fraction=0.3,
))
