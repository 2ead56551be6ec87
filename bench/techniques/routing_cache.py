from bench.registry import Technique, register
from bk.adaptive.routing_cache import CachedRoutingLanguageModel

register(Technique(
    name="routing_cache",
    summary="Top-1 routing through a verified per-layer cache, an offline fast path for "
            "frequent low-entropy tokens, then the router; weights are the dense model's.",
    model=CachedRoutingLanguageModel,
    # Not training: the fine-tuning steps stream train batches into the calibration statistics
    # with the dense weights left unchanged (calibrate_only, the model's default).
    finetune_fraction=0.1,
    updates_weights=False,  # its fine-tuning steps only gather routing statistics
))
