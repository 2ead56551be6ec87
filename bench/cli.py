"""The ``bk-bench`` command."""

from __future__ import annotations

import argparse
import importlib
import math
import signal
import sys
import threading
from pathlib import Path
from typing import Any, NoReturn

# Timing is single-threaded everywhere in bk-bench (two threads on two cores are ~10x noisier).
import torch

torch.set_num_threads(1)

from bench.baselines import BASELINES  # noqa: E402
from bench.pipeline import Setup  # noqa: E402

# Subcommands that live in their own modules, each exposing add_arguments(parser) and run(args).
PLUGINS = {
    "tune": ("bench.tune", "quality-constrained tuning of a technique's knobs (Optuna)"),
    "decode": ("bench.decode_report", "state-cached generation and tree-search speed figures"),
    "routing-stats": ("bench.routing_stats", "token frequency, router entropy, tier shares"),
    "report": ("bench.report", "write the static HTML report"),
    "calibrate": ("bench.calibrate", "false-alarm and detection rates of the CI gate, measured "
                                     "as it runs; chooses its factor and passes"),
    "ceilings": ("bench.ceilings", "each technique's speedup with its decisions given for free, "
                                   "at any scale (no training)"),
}


EXIT_CODES = """exit status:
  0  success
  1  a check failed: a regression against the baseline record (baseline check), or no
     configuration within the quality budget (tune, tune --validate)
  2  bad input or usage: an invalid option, a malformed or missing file, a setup that differs
     from the record's, a dirty working tree for a record, or not enough memory for a setting;
     reported as one line 'bk-bench <command>: error: ...'"""

# Settings to lower when a command runs out of memory, by argparse destination.
MEMORY_SETTINGS = {"batch_size": "--batch-size", "seq_len": "--seq-len", "batch": "--batch",
                   "tokens": "--tokens", "samples": "--samples"}


class Parser(argparse.ArgumentParser):
    """argparse with usage errors on one line, ``bk-bench <command>: error: ...`` (exit 2)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


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


LARGEST = 2**62  # beyond any real setting, and within torch's int64 sizes


def _int_at_least(text: str, low: int) -> int:
    expected = f"an integer from {low} to 2**62"
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
    if not low <= value <= LARGEST:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text}")
    return value


def positive_int(text: str) -> int:
    return _int_at_least(text, 1)


def nonnegative_int(text: str) -> int:
    return _int_at_least(text, 0)


def fraction(text: str) -> float:
    """A finite number in [0, 1)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {text!r}") from None
    if not 0 <= value < 1:  # NaN fails this too
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {text}")
    return value


def scale_name(text: str) -> str:
    """A model scale of ``bk.model.SCALES``."""
    from bk.model import SCALES

    if text not in SCALES:
        raise argparse.ArgumentTypeError(f"expected one of {', '.join(SCALES)}, got {text!r}")
    return text


def add_setup_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("workload and training")
    group.add_argument("--quick", action="store_true",
                       help="a small version: short training, part of the test split")
    group.add_argument("--scale", type=scale_name, default="tiny",
                       help="model size (bk.model.SCALES): tiny (default), small or base, each "
                            "with its defaults for training steps, timed batches and rounds "
                            "(bench.pipeline.SCALE_SETTINGS)")
    group.add_argument("--corpus", default="shakespeare",
                       help="shakespeare (default), synthetic, or text:PATH[:word]")
    group.add_argument("--steps", type=nonnegative_int,
                       help="dense training steps (default: the scale's, 1500 at tiny; quick "
                            "300)")
    group.add_argument("--rounds", type=positive_int,
                       help="passes over the workload, timed interleaved batch by batch "
                            "(default 3; quick 12)")
    group.add_argument("--batch-size", type=positive_int, default=32)
    group.add_argument("--seq-len", type=positive_int, default=128)
    group.add_argument("--seed", type=nonnegative_int, default=0)
    group.add_argument("--output", type=Path, default=Path("runs"),
                       help="folder for results, plots and cached checkpoints (default runs/)")
    group.add_argument("--no-progress", action="store_true", help="no progress bars")


def setup_from(args: argparse.Namespace) -> Setup:
    chosen: dict[str, Any] = {"corpus": args.corpus, "batch_size": args.batch_size,
                              "seq_len": args.seq_len, "seed": args.seed,
                              "output": args.output, "progress": not args.no_progress}
    if args.steps is not None:
        chosen["steps"] = args.steps
    if args.rounds is not None:
        chosen["rounds"] = args.rounds
    return (Setup.quick if args.quick else Setup.at_scale)(args.scale, **chosen)


def cmd_run(args: argparse.Namespace) -> int:
    from bench import baselines
    from bench.run import run

    if args.record:
        commit = baselines.git_commit(allow_dirty=args.allow_dirty)  # refuse before measuring
    else:
        try:
            commit = baselines.git_commit(allow_dirty=True)
        except ValueError:
            commit = "unknown"
    record = run(setup_from(args), args.techniques, commit=commit)
    if args.record:
        if not record["techniques"]:
            raise ValueError("--record needs at least one technique besides dense")
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
    from bench.pipeline import Bench
    from bench.run import frame, render

    bench = Bench(setup_from(args))
    row = bench.measure(args.technique, dict(args.knob or []))
    print(render(frame([row]), extra=list(row.stats)))
    if row.noise_warning:
        print(f"warning: {row.noise_warning}")
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

    root = args.baselines
    target = baselines.Target.load(root if (root / "target.json").is_file() else
                                   baselines.BASELINES)
    setup = setup_from(args)
    if args.action == "check":  # refuse before measuring anything
        path, latest = baselines.latest_comparable(baselines.records(root), setup.describe())
    else:
        # The commit when the code was imported: the code measured (refused before measuring).
        commit = baselines.git_commit(allow_dirty=args.allow_dirty)
    rows = [r for r in measure_all(Bench(setup, target=target), args.techniques)
            if r.technique != "dense"]
    if args.action == "record":
        rec = baselines.make_record(rows, setup.describe(), target, commit)
        path = baselines.record(rec, root)
        cum = rec["cumulative"]
        print(f"recorded {path} (cumulative {cum['speedup']:.2f}x from {cum['source']})")
        return 0
    checked = baselines.check(rows, latest, target, setup=setup.describe(),
                              tolerance=args.tolerance)
    print(f"against {latest['commit'][:10]} ({latest['date']}, scale {setup.scale}):")
    print(f"{'technique':<16}{'recorded':>10}{'measured':>10}{'ppl delta':>11}  status")
    for r in checked:
        recorded = "new" if math.isnan(r.recorded) else f"{r.recorded:.2f}x"
        delta = "n/a" if r.quality_delta is None else f"{r.quality_delta:+.1%}"
        print(f"{r.technique:<16}{recorded:>10}{r.measured:>9.2f}x{delta:>11}  "
              f"{r.problem or 'ok'}")
    return 1 if any(r.problem for r in checked) else 0


def add_allow_dirty(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--allow-dirty", action="store_true",
                        help="record from a working tree with uncommitted changes, as commit "
                             "'<sha>-dirty' (otherwise refused)")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="bk-bench",
        description="Honest speedups, quality deltas and correctness for adaptive-computation "
                    "language models built on ResNet-BK.",
        epilog=EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="the main job: train, measure and report every technique")
    add_setup_arguments(p)
    p.add_argument("--techniques", nargs="+", help="only these registered techniques")
    p.add_argument("--record", action="store_true",
                   help="also write these measurements as this commit's baseline record")
    add_allow_dirty(p)
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
    p.add_argument("--tolerance", type=fraction,
                   help="relative speedup drop that fails the check (default: target.json)")
    p.add_argument("--baselines", type=Path, default=BASELINES,
                   help="folder with target.json and records/ (default: the repository's "
                        "baselines/)")
    add_allow_dirty(p)
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


def _out_of_memory(err: BaseException) -> bool:
    text = str(err).lower()
    return isinstance(err, MemoryError | torch.OutOfMemoryError) or (
        isinstance(err, RuntimeError)
        and any(m in text for m in ("can't allocate memory", "out of memory",
                                    "not enough memory")))


def _memory_advice(args: argparse.Namespace) -> str:
    settings = [f"{flag} (now {getattr(args, dest)})" for dest, flag in MEMORY_SETTINGS.items()
                if getattr(args, dest, None) is not None]
    return f"lower {' or '.join(settings)}" if settings else "use smaller settings"


def _terminate(signum: int, frame: Any) -> NoReturn:
    # SIGTERM becomes SystemExit, so files being written are cleaned up on the way out.
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    """Run a command; see EXIT_CODES. Bad input is one line on stderr and exit 2, never a
    traceback."""
    args = build_parser().parse_args(argv)
    on_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminate) if on_main_thread else None
    try:
        return int(args.func(args) or 0)
    except (ValueError, OSError) as err:
        message = str(err)
    except (MemoryError, RuntimeError) as err:
        if not _out_of_memory(err):
            raise
        first = next((line for line in str(err).splitlines() if line.strip()), "")
        message = f"out of memory ({first.strip()[:160]}); {_memory_advice(args)}"
    finally:
        if on_main_thread:
            signal.signal(signal.SIGTERM, previous)
    print(f"bk-bench {args.command}: error: {' '.join(message.split())}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
