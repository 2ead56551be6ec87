"""Where the compute goes: each technique's per-token statistics over a passage of test text.

The passage is the first ``windows`` sequences of the first timed batch (consecutive windows of
the test split, so it reads as continuous text; each window is run from a fresh state, as it
is timed). Every technique reports per-token ``stats`` (``layers_per_token`` at least; exit
layer, experts used, skipped layers ... where it makes those decisions); the report shades each
token by them. Written by ``bk-bench run`` as ``tokens.json`` beside results.json.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch

from bench.pipeline import Bench

SCHEMA = 1
PASSAGE_TOKENS = 512


@torch.no_grad()
def passage_stats(bench: Bench, names: Iterable[str],
                  tokens: int = PASSAGE_TOKENS) -> dict[str, Any]:
    """``{"tokens": [...], "techniques": {name: {stat: [value per token]}}, ...}`` for the
    techniques ``names`` at the setup's knobs (the models ``bench`` trained or loaded)."""
    batch = bench.workload.batches[0]
    windows = min(batch.shape[0], max(1, math.ceil(tokens / batch.shape[1])))
    x = batch[:windows]
    vocab = bench.corpus.vocab
    dense = bench.dense()
    stats: dict[str, dict[str, list[float]]] = {}
    for name in names:
        model = bench.candidate(name).eval()
        out = model(x)
        stats[name] = {stat: [round(float(v), 4) for v in value.reshape(-1).tolist()]
                       for stat, value in sorted(out.stats.items())}
    return {"schema": SCHEMA, "corpus": bench.corpus.name, "level": vocab.level,
            "window": int(x.shape[1]), "n_layers": dense.cfg.n_layers,
            "tokens": [vocab.tokens[i] for i in x.reshape(-1).tolist()], "techniques": stats}
