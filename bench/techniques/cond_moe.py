from bench.registry import Knob, Technique, register
from bk.adaptive.conditional_moe import ConditionalMoELanguageModel

register(Technique(
    name="cond_moe",
    summary="Conditional MoE: a learned difficulty predictor picks k in [k_min, k_max] experts "
            "per token (straight-through Gumbel-softmax, cost penalty on expected k).",
    build=lambda config, knobs: ConditionalMoELanguageModel(
        config, k_min=int(knobs["k_min"]), k_max=int(knobs["k_max"]),
        k_cost=float(knobs["k_cost"]), temperature=float(knobs["temperature"])),
    knobs=(
        Knob("k_min", 1, grid=(0, 1), help="fewest experts per token (0: a token may skip the "
             "feed-forward)"),
        Knob("k_max", 2, grid=(2, 3, 4), low=1, high=4,
             help="most experts per token (at most n_experts)"),
        Knob("k_cost", 0.01, grid=(0.0, 0.01, 0.05), low=1e-4, high=0.2, log=True,
             help="weight of the expected-k penalty in the objective"),
        Knob("temperature", 1.0, grid=(1.0,), low=0.3, high=3.0, log=True,
             help="Gumbel-softmax temperature of the k choice during fine-tuning"),
    ),
    finetune_fraction=0.3,
))
