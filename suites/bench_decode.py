"""asv benchmarks for decoding: state-cached generation (stepped by the compiled
``bk.step_kernel`` or by ``LanguageModel.step``) vs recomputed generation, and MaxEnt-TS with and
without its per-node state cache. The ``track_`` ratios time both sides alternately in one
process (cached over reference time; lower is better), the only comparison that holds still
on these machines: ratios timed in one process moved about 3%, raw timings of the same code in
separate processes up to 40%."""

import torch

from bench.measure import paired_speedup
from bk.decode import decode
from bk.maxent_ts import LogLikelihoodReward, MaxEntTS, SearchConfig
from bk.model import LanguageModel, ModelConfig

PROMPT_LENGTH = 16
SEARCH_TOKENS = 16
_MODELS: dict[int, LanguageModel] = {}


def _model(seed: int) -> LanguageModel:
    if seed not in _MODELS:
        torch.manual_seed(seed)
        _MODELS[seed] = LanguageModel(ModelConfig()).eval()
    return _MODELS[seed]


def _prompt(*shape: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randint(ModelConfig().vocab_size, shape, generator=generator)


def _generate(new_tokens: int, how: str):
    """``how``: "kernel" or "step" (cached) or "recompute"."""
    model, prompt = _model(0), _prompt(1, PROMPT_LENGTH)
    return lambda: decode(model, prompt, new_tokens, temperature=0,
                          use_cache=how != "recompute", kernel=how == "kernel")


def _search(rollouts: int, use_cache: bool):
    model, prompt = _model(0), _prompt(PROMPT_LENGTH)
    reward = LogLikelihoodReward(_model(1), PROMPT_LENGTH)
    config = SearchConfig(rollouts=rollouts, max_new_tokens=SEARCH_TOKENS, use_cache=use_cache)
    return lambda: MaxEntTS(model, prompt, reward, config).run()


class Generation:
    params = ([32, 128], ["kernel", "step", "recompute"])
    param_names = ["new_tokens", "how"]
    timeout = 300

    def setup(self, new_tokens, how):
        self.run = _generate(new_tokens, how)
        self.run()  # compiles the step kernel (numba) outside the timed samples

    def time_generate(self, new_tokens, how):
        self.run()


class GenerationRatio:
    params = [32, 128]
    param_names = ["new_tokens"]
    timeout = 600

    def track_cached_over_recompute_time(self, new_tokens):
        speed = paired_speedup(_generate(new_tokens, "recompute"), _generate(new_tokens, "kernel"),
                               rounds=5)
        return 1 / speed.speedup

    def track_torch_step_over_recompute_time(self, new_tokens):
        speed = paired_speedup(_generate(new_tokens, "recompute"), _generate(new_tokens, "step"),
                               rounds=5)
        return 1 / speed.speedup

    track_cached_over_recompute_time.unit = "ratio"
    track_torch_step_over_recompute_time.unit = "ratio"


class TreeSearch:
    params = ([4, 8], [True, False])
    param_names = ["rollouts", "use_cache"]
    timeout = 300

    def setup(self, rollouts, use_cache):
        self.run = _search(rollouts, use_cache)
        self.run()  # compiles the step kernel (numba) outside the timed samples

    def time_search(self, rollouts, use_cache):
        self.run()


class TreeSearchRatio:
    params = [4, 8]
    param_names = ["rollouts"]
    timeout = 600

    def track_cached_over_uncached_time(self, rollouts):
        speed = paired_speedup(_search(rollouts, False), _search(rollouts, True), rounds=5)
        return 1 / speed.speedup

    track_cached_over_uncached_time.unit = "ratio"
