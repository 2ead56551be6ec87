"""The tiny float64 model the decoding and search tests share."""

from functools import cache

import torch

from bk.model import LanguageModel, ModelConfig

CFG = ModelConfig(vocab_size=17, d_model=16, n_layers=3, n_seq=16, n_experts=2, d_expert=16,
                  bk_channels=2)
EOS = 5


@cache
def tiny_model(seed: int, eos_boost: float = 0.0) -> LanguageModel:
    """A float64 model; ``eos_boost`` raises the EOS logit so that sequences do end."""
    torch.manual_seed(seed)
    model = LanguageModel(CFG).double().eval()
    with torch.no_grad():
        model.head.bias[EOS] += eos_boost
    return model
