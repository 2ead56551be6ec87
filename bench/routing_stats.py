"""`bk-bench routing-stats`: per-token router statistics and the share of tokens each routing tier
would take (issue 7).

Calibration runs the model's plain router over the first train batches and records, per layer
and token id, the frequency and the router entropy ``H(mean p)`` (see
``bk.adaptive.routing_cache``). The tier shares come from routing the first test batches through
a :class:`CachedRoutingLanguageModel` with the model's weights and the chosen preset; the caches
persist across those batches, as they do when the bench times the technique.
"""

from __future__ import annotations

import argparse
import itertools
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
import torch
from torch import nn

from bench.cli import scale_name
from bench.files import write_atomic
from bk.adaptive.routing_cache import PRESETS, TIER_NAMES, CachedRoutingLanguageModel
from bk.data import Corpus, load_corpus


def routing_stats(model: nn.Module, corpus: Corpus, *, preset: str = "balanced",
                  calibration_batches: int = 50,
                  eval_batches: int = 10, batch_size: int = 32,
                  seq_len: int | None = None) -> dict[str, pd.DataFrame]:
    """``{"tokens": per (layer, token id) statistics, "tiers": share of decisions per tier}``.

    ``model`` is any model with the dense parameter names (``LanguageModel`` or a subclass).
    """
    if calibration_batches < 1 or eval_batches < 1:
        raise ValueError(f"need calibration_batches >= 1 and eval_batches >= 1, got "
                         f"{calibration_batches} and {eval_batches}")
    seq_len = seq_len or model.cfg.n_seq
    cached = CachedRoutingLanguageModel(model.cfg, preset=preset)
    unexpected = cached.load_state_dict(model.state_dict(), strict=False).unexpected_keys
    if unexpected:
        raise ValueError(f"the model has parameters the routed model does not: {unexpected}")
    calibration = (x for x, _ in itertools.islice(
        corpus.batches("train", batch_size, seq_len), calibration_batches))
    cached.observe_batches(calibration)
    cached.eval()
    with torch.no_grad():
        for x, _ in itertools.islice(corpus.batches("test", batch_size, seq_len), eval_batches):
            cached(x)
    return {"tokens": token_frame(cached, corpus), "tiers": tier_frame(cached)}


def token_frame(cached: CachedRoutingLanguageModel, corpus: Corpus) -> pd.DataFrame:
    freq, entropy, mean_p = cached.token_statistics()
    expert, gate = cached.fast_path_table()
    usual_gate, usual_expert = mean_p.max(dim=-1)
    rows = []
    for layer in range(cached.cfg.n_layers):
        for token in range(cached.cfg.vocab_size):
            rows.append({
                "layer": layer,
                "token": token,
                "text": corpus.vocab.tokens[token] if token < len(corpus.vocab) else "",
                "frequency": int(freq[token]),
                "router_entropy": float(entropy[layer, token]),
                "usual_expert": int(usual_expert[layer, token]) if freq[token] > 0 else -1,
                "usual_gate": float(usual_gate[layer, token]),
                "fast_path": bool(expert[layer, token] >= 0),
            })
    return pd.DataFrame(rows)


def tier_frame(cached: CachedRoutingLanguageModel) -> pd.DataFrame:
    totals = cached.tier_totals.double()
    shares = totals / totals.sum(dim=1, keepdim=True).clamp(min=1)
    overall = totals.sum(dim=0) / totals.sum().clamp(min=1)
    rows = [{"layer": str(layer), **dict(zip(TIER_NAMES, map(float, shares[layer]),
                                             strict=True))}
            for layer in range(len(shares))]
    rows.append({"layer": "all", **dict(zip(TIER_NAMES, map(float, overall), strict=True))})
    return pd.DataFrame(rows)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help="a trained model checkpoint (default: the bench's dense model)")
    parser.add_argument("--quick", action="store_true",
                        help="with no --checkpoint: the quick setup's dense model")
    parser.add_argument("--scale", type=scale_name, default="tiny",
                        help="with no --checkpoint: the dense model of this scale (default tiny)")
    parser.add_argument("--corpus", default="shakespeare")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="balanced")
    parser.add_argument("--calibration-batches", type=int, default=50)
    parser.add_argument("--eval-batches", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--top", type=int, default=20, help="token rows printed per layer")
    parser.add_argument("--csv", type=Path, default=None,
                        help="write the per-token table to this CSV file")


def run(args: argparse.Namespace) -> int:
    torch.set_num_threads(1)
    if args.checkpoint is not None:
        from bk.train import load_model

        model, _ = load_model(args.checkpoint)
        corpus = load_corpus(args.corpus)
    else:
        from bench.pipeline import Bench, Setup

        setup = (Setup.quick if args.quick else Setup.at_scale)(args.scale, corpus=args.corpus,
                                                                progress=False)
        bench = Bench(setup)
        model, corpus = bench.dense(), bench.corpus
    tables = routing_stats(model, corpus, preset=args.preset,
                           calibration_batches=args.calibration_batches,
                           eval_batches=args.eval_batches, batch_size=args.batch_size)
    tokens = tables["tokens"]
    with pd.option_context("display.width", 120, "display.max_columns", 20):
        for layer, frame in tokens.groupby("layer"):
            print(f"\nlayer {layer}: most frequent tokens")
            print(frame.sort_values("frequency", ascending=False).head(args.top)
                  .to_string(index=False, float_format=lambda v: f"{v:.3f}"))
        print(f"\nshare of (token, layer) decisions per tier, preset {args.preset!r}")
        print(tables["tiers"].to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    if args.csv is not None:
        write_atomic(args.csv, tokens.to_csv(index=False))
        print(f"written: {args.csv}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bk-bench routing-stats", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
