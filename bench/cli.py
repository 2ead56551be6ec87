"""The ``bk-bench`` command."""

from __future__ import annotations

import argparse
import importlib
import math
import sys
from pathlib import Path
from typing import Any

# Timing is single-threaded everywhere in bk-bench (two threads on two cores are ~10x noisier).
import torch

torch.set_num_threads(1)

from bench.pipeline import Setup  # noqa: E402

# Subcommands that live in their own modules, each exposing add_arguments(parser) and run(args).
PLUGINS = {
    "tune": ("bench.tune", "quality-constrained tuning of a technique's knobs (Optuna)"),
    "decode": ("bench.decode_report", "state-cached generation and tree-search speed figures"),
    "routing-stats": ("bench.routing_stats", "token frequency, router entropy, tier shares"),
    "report": ("bench.report", "write the static HTML report"),
    "calibrate": ("bench.calibrate", "false-alarm and detection rates of the CI gate, measured "
                                     "as it runs; chooses its factor and passes"),
}


def parse_value(text: str) -> Any:
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def parse_setting(text: str) -> tuple[str, Any]:
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    return name, parse_value(value)


def parse_values(text: str) -> tuple[str, list[Any]]:
    name, sep, values = text.partition("=")
    if not sep or not name or not values:
        raise argparse.ArgumentTypeError(f"expected NAME=V1,V2,..., got {text!r}")
    return name, [parse_value(v) for v in values.split(",")]


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def add_setup_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("workload and training")
    group.add_argument("--quick", action="store_true",
                       help="a small version: short training, part of the test split")
    group.add_argument("--corpus", default="shakespeare",
                       help="shakespeare (default), synthetic, or text:PATH[:word]")
    group.add_argument("--steps", type=int, help="dense training steps (default 1500; quick 300)")
    group.add_argument("--rounds", type=positive_int,
                       help="passes over the workload, timed interleaved batch by batch "
                            "(default 3; quick 12)")
    group.add_argument("--batch-size", type=positive_int, default=32)
    group.add_argument("--seq-len", type=positive_int, default=128)
    group.add_argument("--seed", type=int, default=0)
    group.add_argument("--output", type=Path, default=Path("runs"),
                       help="folder for results, plots and cached checkpoints (default runs/)")
    group.add_argument("--no-progress", action="store_true", help="no progress bars")


def setup_from(args: argparse.Namespace) -> Setup:
    chosen: dict[str, Any] = {"corpus": args.corpus, "batch_size": args.batch_size,
                              "seq_len": args.seq_len, "seed": args.seed,
                              "output": args.output, "progress": not args.no_progress}
    if args.steps is not None:
        if args.steps < 0:
            raise SystemExit(f"bk-bench: --steps must be >= 0, got {args.steps}")
        chosen["steps"] = args.steps
    if args.rounds is not None:
        chosen["rounds"] = args.rounds
    return Setup.quick(**chosen) if args.quick else Setup(**chosen)


def cmd_run(args: argparse.Namespace) -> int:
    from bench.baselines import git_commit
    from bench.run import run

    try:
        commit = git_commit()
    except ValueError:
        commit = "unknown"
    record = run(setup_from(args), args.techniques, commit=commit)
    if args.record:
        from bench import baselines

        if commit == "unknown" or not record["techniques"]:
            raise ValueError("--record needs a git checkout and at least one technique")
        print(f"recorded {baselines.record(record)}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from bench.pipeline import Bench
    from bench.run import baseline_quality

    bench = Bench(setup_from(args))
    q = baseline_quality(bench)
    print(f"dense test loss {q['dense_test_nats']:.4f} nats/char = {q['dense_test_bits']:.3f} "
          f"bits/char (perplexity {q['dense_test_perplexity']:.2f})")
    print(f"unigram {q['unigram_test_bits']:.3f} bits/char, bigram {q['bigram_test_bits']:.3f} "
          f"bits/char (add-alpha smoothing, alpha chosen on validation)")
    return 0


def cmd_measure(args: argparse.Namespace) -> int:
    from bench.baselines import Target
    from bench.pipeline import Bench
    from bench.run import frame, render

    bench = Bench(setup_from(args))
    knobs = dict(args.knob or [])
    c = bench.measure(args.technique, knobs)
    print(render(frame([c], Target.load(), {c.name: knobs}),
                 extra=[k for k in c.extra if k.startswith("mean_")]))
    if c.speed.warning:
        print(f"warning: {c.speed.warning}")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from bench.run import render, sweep

    knob, values = args.knob
    df, path = sweep(setup_from(args), args.technique, knob, values, dict(args.set or []))
    print(render(df, extra=[knob, *[c for c in df.columns if c.startswith("mean_")]]))
    print(f"\nwritten: {path}.csv and {path}.json")
    return 0


def cmd_baseline(args: argparse.Namespace) -> int:
    from bench import baselines
    from bench.pipeline import Bench
    from bench.run import measure_all

    target = baselines.Target.load()
    if args.action == "check":
        records = baselines.history()
        if not records:
            raise SystemExit("bk-bench: no baseline record to check against; run "
                             "`bk-bench baseline record` first")
        latest = records[-1]
    setup = setup_from(args)
    comparisons = [c for c in measure_all(Bench(setup), args.techniques) if c.name != "dense"]
    if args.action == "record":
        rec = baselines.make_record(comparisons, setup.describe(), target, baselines.git_commit())
        path = baselines.record(rec)
        cum = rec["cumulative"]
        print(f"recorded {path} (cumulative {cum['speedup']:.2f}x from {cum['source']})")
        return 0
    rows = baselines.check(comparisons, latest, target, args.tolerance)
    print(f"against {latest['commit'][:10]} ({latest['date']}):")
    print(f"{'technique':<16}{'recorded':>10}{'measured':>10}{'ppl delta':>11}  status")
    for r in rows:
        recorded = "new" if math.isnan(r.recorded) else f"{r.recorded:.2f}x"
        delta = "n/a" if r.quality_delta is None else f"{r.quality_delta:+.1%}"
        print(f"{r.technique:<16}{recorded:>10}{r.measured:>9.2f}x{delta:>11}  "
              f"{r.problem or 'ok'}")
    return 1 if any(r.problem for r in rows) else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bk-bench",
        description="Honest speedups, quality deltas and correctness for adaptive-computation "
                    "language models built on ResNet-BK.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="the main job: train, measure and report every technique")
    add_setup_arguments(p)
    p.add_argument("--techniques", nargs="+", help="only these registered techniques")
    p.add_argument("--record", action="store_true",
                   help="also write these measurements as this commit's baseline record")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("train", help="train (or load) the dense baseline and score it")
    add_setup_arguments(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("measure", help="measure one technique against the dense baseline")
    p.add_argument("technique")
    p.add_argument("--knob", type=parse_setting, action="append", metavar="NAME=VALUE")
    add_setup_arguments(p)
    p.set_defaults(func=cmd_measure)

    p = sub.add_parser("sweep", help="measure a technique at each value of one knob")
    p.add_argument("technique")
    p.add_argument("--knob", type=parse_values, required=True, metavar="NAME=V1,V2,...")
    p.add_argument("--set", type=parse_setting, action="append", metavar="NAME=VALUE",
                   help="other knobs held fixed")
    add_setup_arguments(p)
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("baseline", help="record or check the per-commit baseline")
    p.add_argument("action", choices=["record", "check"])
    p.add_argument("--techniques", nargs="+", help="only these registered techniques")
    p.add_argument("--tolerance", type=float,
                   help="relative speedup drop that fails the check (default: target.json)")
    add_setup_arguments(p)
    p.set_defaults(func=cmd_baseline)

    for name, (module, help_text) in PLUGINS.items():
        try:
            plugin = importlib.import_module(module)
        except ModuleNotFoundError as err:
            if err.name != module:
                raise
            continue
        p = sub.add_parser(name, help=help_text)
        plugin.add_arguments(p)
        p.set_defaults(func=plugin.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        print(f"bk-bench {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
