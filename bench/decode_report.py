"""`bk-bench decode`: measured speed of state-cached generation and of MaxEnt-TS.

Three figures, each a paired in-process ratio on one thread (bench.measure.paired_speedup):

* generation: tokens/s of ``generate`` (state cache) against ``generate_recompute`` (a full
  forward over the whole growing prefix per token) at the same tokens, once with the compiled
  step (``bk.step_kernel``) and once with ``LanguageModel.step``;
* same work, faster: MaxEnt-TS with its per-node state cache against ``use_cache=False`` at equal
  rollouts and tokens (both find the same sequences);
* less work: the cached search with fewer rollouts or tokens against the largest setting, with
  the best reward found beside the time, since doing less can find worse sequences.

Writes ``decode.json`` and one CSV per figure to ``--out``.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from bench.cli import scale_name
from bench.files import dump_json, write_atomic

if TYPE_CHECKING:  # the model code is imported where it runs: `bk-bench decode --help` needs none
    from bk.model import LanguageModel


def _ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}"
                                         ) from err
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help="the model to decode with (bk checkpoint); default: a randomly "
                             "initialised model of --scale")
    parser.add_argument("--scale", type=scale_name, default="tiny",
                        help="with no --checkpoint: the model size (bk.model.SCALES; default "
                             "tiny)")
    parser.add_argument("--reward-checkpoint", type=Path, default=None,
                        help="the second model whose log-likelihood is the search reward; "
                             "default: an independently initialised model of the same config")
    parser.add_argument("--out", type=Path, default=Path("runs/decode"),
                        help="directory for decode.json and the CSV tables")
    parser.add_argument("--tokens", type=_ints, default=[512],
                        help="generated tokens per sequence for the generation figure")
    parser.add_argument("--batch", type=_ints, default=[1, 8], help="generation batch sizes")
    parser.add_argument("--prompt-length", type=int, default=16)
    parser.add_argument("--rollouts", type=_ints, default=[5, 10],
                        help="MaxEnt-TS rollouts per sample; the largest is the 'less work' "
                             "reference")
    parser.add_argument("--search-tokens", type=_ints, default=[25, 50],
                        help="MaxEnt-TS max_new_tokens; the largest is the 'less work' reference")
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument("--samples", type=int, default=2,
                        help="search samples (prompts) per timed call")
    parser.add_argument("--rounds", type=int, default=5, help="paired timing rounds")
    parser.add_argument("--seed", type=int, default=0)


def _models(args: argparse.Namespace) -> tuple[LanguageModel, LanguageModel]:
    """The model to decode with and an independently initialised second model (the reward)."""
    import torch

    from bk.model import LanguageModel, ModelConfig
    from bk.train import load_model

    if args.checkpoint is not None:
        model, _ = load_model(args.checkpoint)
        cfg = model.cfg
    else:
        cfg = ModelConfig.at_scale(args.scale)
        torch.manual_seed(args.seed)
        model = LanguageModel(cfg)
    if args.reward_checkpoint is not None:
        scorer, _ = load_model(args.reward_checkpoint)
        if scorer.cfg.vocab_size != cfg.vocab_size:
            raise ValueError(f"the reward model's vocabulary ({scorer.cfg.vocab_size} tokens) "
                             f"differs from the decoding model's ({cfg.vocab_size})")
    else:
        torch.manual_seed(args.seed + 1)
        scorer = LanguageModel(cfg)
    return model.eval(), scorer.eval()


def generation_rows(model: LanguageModel, args: argparse.Namespace) -> list[dict[str, object]]:
    """Cached generation, stepped by the compiled kernel and by ``model.step``, each paired
    with recomputation (the kernel and the torch step do the same work; only the speed of one
    step differs). The quality check is exact: ``same_tokens`` says whether the cached run
    generated the very tokens recomputation did."""
    import torch

    from bench.measure import paired_speedup
    from bk.decode import decode

    rows = []
    for batch in args.batch:
        for tokens in args.tokens:
            g = torch.Generator().manual_seed(args.seed)
            prompt = torch.randint(model.cfg.vocab_size, (batch, args.prompt_length), generator=g)
            recompute = partial(decode, model, prompt, tokens, temperature=0, use_cache=False)
            reference = recompute()
            for step in ("kernel", "torch"):
                cached = partial(decode, model, prompt, tokens, temperature=0,
                                 kernel=step == "kernel")
                speed = paired_speedup(recompute, cached, rounds=args.rounds)
                generated = cached()
                rows.append({
                    "batch": batch, "prompt_length": args.prompt_length, "new_tokens": tokens,
                    "step": step,
                    "cached_tokens_per_s": batch * tokens / speed.t_candidate,
                    "recompute_tokens_per_s": batch * tokens / speed.t_reference,
                    "speedup": speed.speedup, "speedup_q1": speed.q1, "speedup_q3": speed.q3,
                    "cached_positions": generated.work.positions,
                    "recompute_positions": reference.work.positions,
                    "same_tokens": torch.equal(generated.tokens, reference.tokens),
                    "noise_warning": speed.warning,
                })
    return rows


def _searcher(model, scorer, prompts, config):
    """A timed call: one search per prompt; returns the mean best reward."""
    from bk.maxent_ts import LogLikelihoodReward, MaxEntTS

    def run() -> float:
        total = 0.0
        for prompt in prompts:
            reward = LogLikelihoodReward(scorer, len(prompt))
            total += MaxEntTS(model, prompt, reward, config).run().best.reward
        return total / len(prompts)
    return run


def search_rows(model: LanguageModel, scorer: LanguageModel, args: argparse.Namespace
                ) -> tuple[list[dict[str, object]], list[dict[str, object]]]:
    import torch

    from bench.measure import paired_speedup
    from bk.maxent_ts import SearchConfig

    g = torch.Generator().manual_seed(args.seed + 2)
    prompts = [torch.randint(model.cfg.vocab_size, (args.prompt_length,), generator=g)
               for _ in range(args.samples)]
    base = dict(top_k=args.top_k, seed=args.seed)
    largest = SearchConfig(rollouts=max(args.rollouts), max_new_tokens=max(args.search_tokens),
                           **base)
    same, less = [], []
    for rollouts in args.rollouts:
        for tokens in args.search_tokens:
            config = SearchConfig(rollouts=rollouts, max_new_tokens=tokens, **base)
            cached = _searcher(model, scorer, prompts, config)
            uncached = _searcher(model, scorer, prompts,
                                 SearchConfig(**(vars(config) | {"use_cache": False})))
            speed = paired_speedup(uncached, cached, rounds=args.rounds)
            reward = cached()
            same.append({
                "rollouts": rollouts, "max_new_tokens": tokens,
                "cached_s_per_sample": speed.t_candidate / len(prompts),
                "uncached_s_per_sample": speed.t_reference / len(prompts),
                "speedup": speed.speedup, "speedup_q1": speed.q1, "speedup_q3": speed.q3,
                "best_reward": reward, "same_result": reward == uncached(),
                "noise_warning": speed.warning,
            })
            if config != largest:
                reference = _searcher(model, scorer, prompts, largest)
                speed = paired_speedup(reference, cached, rounds=args.rounds)
                less.append({
                    "rollouts": rollouts, "max_new_tokens": tokens,
                    "reference": f"rollouts={largest.rollouts}, "
                                 f"max_new_tokens={largest.max_new_tokens}",
                    "s_per_sample": speed.t_candidate / len(prompts),
                    "reference_s_per_sample": speed.t_reference / len(prompts),
                    "speedup": speed.speedup, "speedup_q1": speed.q1, "speedup_q3": speed.q3,
                    "best_reward": reward, "reference_best_reward": reference(),
                    "noise_warning": speed.warning,
                })
    return same, less


def _write_csv(path: Path, rows: list[dict[str, object]]) -> None:
    import pandas as pd

    if rows:
        write_atomic(path, pd.DataFrame(rows).to_csv(index=False))


def _print_table(title: str, rows: list[dict[str, object]]) -> None:
    import pandas as pd

    print(f"\n{title}")
    if not rows:
        return
    frame = pd.DataFrame(rows)
    print(frame.drop(columns="noise_warning").to_string(index=False, float_format="{:.4g}".format))
    for warning in frame["noise_warning"].dropna():
        print(f"warning: {warning}")


def run(args: argparse.Namespace) -> None:
    import torch

    from bk.train import torch_threads

    if args.prompt_length < 1 or args.samples < 1 or args.rounds < 1 or args.top_k < 1:
        raise ValueError("--prompt-length, --samples, --rounds and --top-k must be >= 1")
    model, scorer = _models(args)
    with torch_threads(1), torch.no_grad():
        generation = generation_rows(model, args)
        same, less = search_rows(model, scorer, args)
    report = {
        "model": asdict(model.cfg),
        "checkpoint": None if args.checkpoint is None else str(args.checkpoint),
        "reward_checkpoint": (None if args.reward_checkpoint is None
                              else str(args.reward_checkpoint)),
        "command_args": {k: str(v) for k, v in vars(args).items() if k != "func"},
        "generation": generation, "search_same_work": same, "search_less_work": less,
    }
    write_atomic(args.out / "decode.json", dump_json(report))
    _write_csv(args.out / "generation.csv", generation)
    _write_csv(args.out / "search_same_work.csv", same)
    _write_csv(args.out / "search_less_work.csv", less)
    _print_table("Generation: state cache vs full recomputation (greedy, no EOS)", generation)
    _print_table("MaxEnt-TS, same work, faster: cache vs no cache", same)
    _print_table("MaxEnt-TS, less work: fewer rollouts or tokens (cached)", less)
    print(f"\nwrote {args.out}/decode.json and CSV tables")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    run(parser.parse_args())


if __name__ == "__main__":
    main()
