"""The ``bk-bench`` command.

Only argparse-level modules are imported here, so ``bk-bench --help`` and ``bk-bench COMMAND
--help`` answer without importing torch (seconds on a loaded machine): each command's handler
imports what it needs, and a plugin's module is imported only when its command runs.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import importlib.util
import math
import signal
import sys
import threading
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

if TYPE_CHECKING:
    from bench.pipeline import Setup

KNOBS_HELP = ("every technique's knobs, with their types, valid values, defaults and meaning: "
              "bk-bench techniques")

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
PLUGIN_EPILOGS = {"tune": KNOBS_HELP}


EXIT_CODES = """exit status:
  0  success
  1  a check failed: a regression against the baseline record (baseline check), or no
     configuration within the quality budget (tune, tune --validate)
  2  bad input or usage: an invalid option or knob value (checked before anything trains), a
     malformed or missing file, a setup that differs from the record's, a dirty working tree
     for a record, or not enough memory for a setting; reported as one line
     'bk-bench <command>: error: ...'"""

# Settings to lower when a command runs out of memory, by argparse destination.
MEMORY_SETTINGS = {"batch_size": "--batch-size", "seq_len": "--seq-len", "batch": "--batch",
                   "tokens": "--tokens", "samples": "--samples"}


class Parser(argparse.ArgumentParser):
    """argparse with usage errors on one line, ``bk-bench <command>: error: ...`` (exit 2)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def parse_value(text: str) -> Any:
    from bk.technique import value_from_text  # torch: only once a value is given

    return value_from_text(text)


def parse_setting(text: str) -> tuple[str, Any]:
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    return name, parse_value(value)


def parse_technique_setting(text: str) -> tuple[str, str, Any]:
    """``TECHNIQUE.KNOB=VALUE``: a knob of one technique, for commands that measure several."""
    name, value = parse_setting(text)
    technique, dot, knob = name.partition(".")
    if not dot or not technique or not knob:
        raise argparse.ArgumentTypeError(f"expected TECHNIQUE.KNOB=VALUE (e.g. "
                                         f"multiscale.levels=3), got {text!r}")
    return technique, knob, value


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


def nonnegative_float(text: str) -> float:
    """A finite number >= 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if not (value >= 0 and math.isfinite(value)):  # NaN fails this too
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text}")
    return value


def positive_float(text: str) -> float:
    """A finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}") from None
    if not (value > 0 and math.isfinite(value)):  # NaN fails this too
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text}")
    return value


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
    group.add_argument("--finetune", type=positive_float, metavar="FACTOR",
                       help="multiplies every technique's fine-tuning steps (its fraction of the "
                            "dense steps; default: the scale's factor, 1 at tiny, 2/3 at small); "
                            "the dense control trains as many steps")
    group.add_argument("--start", choices=("dense", "scratch"), default="dense",
                       help="where each technique's training starts: dense (default: fine-tuned "
                            "from the trained dense model, against the dense control trained as "
                            "many steps) or scratch (trained from random initialisation for the "
                            "dense model's steps, against the dense model: same steps, schedule "
                            "and batches). A technique whose steps only calibrate starts from "
                            "the dense weights either way")
    group.add_argument("--distill", type=nonnegative_float, default=0.0,
                       help="weight of the distillation term KL(dense || technique) while a "
                            "technique trains (default 0: none; the dense control never "
                            "distils)")
    group.add_argument("--output", type=Path, default=Path("runs"),
                       help="folder for results, plots and cached checkpoints (default runs/)")
    group.add_argument("--no-progress", action="store_true", help="no progress bars")


def add_split_argument(parser: argparse.ArgumentParser, default: str) -> None:
    """``--quality-split``, for the commands that choose knobs as well as report them."""
    parser.add_argument("--quality-split", choices=("valid", "test"), default=default,
                        help=f"the held-out split that scores quality (default {default}): valid "
                             "to choose knobs, test to report them; a choice made on test and "
                             "reported on test flatters it")


def setup_from(args: argparse.Namespace) -> Setup:
    from bench.pipeline import Setup

    chosen: dict[str, Any] = {"corpus": args.corpus, "batch_size": args.batch_size,
                              "seq_len": args.seq_len, "seed": args.seed,
                              "distill": args.distill, "start": args.start,
                              "output": args.output,
                              "progress": not args.no_progress}
    if args.steps is not None:
        chosen["steps"] = args.steps
    if args.rounds is not None:
        chosen["rounds"] = args.rounds
    if args.finetune is not None:
        chosen["finetune_factor"] = args.finetune
    if getattr(args, "quality_split", None) is not None:
        chosen["quality_split"] = args.quality_split
    knobs: dict[str, dict[str, Any]] = {}
    for technique, knob, value in getattr(args, "technique_knobs", None) or []:
        knobs.setdefault(technique, {})[knob] = value
    if knobs:
        chosen["knobs"] = knobs
    return (Setup.quick if args.quick else Setup.at_scale)(args.scale, **chosen)


def check_knobs(setup: Setup, technique: str,
                settings: Sequence[Mapping[str, Any]] = ({},)) -> None:
    """Check every knob setting of ``technique`` before anything trains.

    Each value is checked against its knob's declaration, then the model is built at the
    setup's size (a random initialisation, no training), which checks the constraints between
    knobs and the model (``k_min <= k_max <= n_experts``, ``levels`` against ``n_layers`` ...).
    A bad setting raises ``ValueError`` naming the knob; the global random state is untouched.
    """
    import torch

    from bench.registry import REFERENCE, get
    from bk.data import load_corpus

    chosen = get(technique)
    resolved = [chosen.resolve(knobs) for knobs in settings]  # every value, before any build
    if chosen.name != REFERENCE and chosen.build is not None:
        config = setup.model_config(load_corpus(setup.corpus))
        with torch.random.fork_rng(devices=[]):
            for values in resolved:
                chosen.build(config, values)


def check_techniques(setup: Setup, names: Iterable[str] | None) -> None:
    """Every chosen technique (all when ``names`` is None) exists and builds at the setup's
    knobs, each of which is for a chosen technique."""
    from bench.run import chosen

    for name in chosen(names, setup.knobs):
        check_knobs(setup, name, [setup.knobs.get(name, {})])


def cmd_techniques(args: argparse.Namespace) -> int:
    from bench.console import techniques_text
    from bench.registry import get, techniques

    chosen = [get(name) for name in args.names] if args.names else techniques().values()
    print(techniques_text(chosen))
    print("\nset a knob: bk-bench measure TECHNIQUE --knob NAME=VALUE; one row per value: "
          "bk-bench sweep\nTECHNIQUE --knob NAME=V1,V2,...; search: bk-bench tune TECHNIQUE")
    return 0


def write_report(results: Path, out: Path) -> str:
    """The HTML report over ``results`` in ``out``; what to print about it (a report that cannot
    be written is a note, not a failure: the measurements are already published)."""
    from bench import report

    try:
        index = report.build(report.Inputs.defaults(results), out)
    except (ValueError, OSError) as err:
        return (f"report not written ({' '.join(str(err).split())}); write it with: bk-bench "
                f"report --results {results} --output {out}")
    return f"full report (figures, per-token work, history): {index}"


def cmd_run(args: argparse.Namespace) -> int:
    from bench import baselines
    from bench.baselines import Target
    from bench.console import run_summary
    from bench.files import read_json
    from bench.measure import NOISE_LIMIT
    from bench.run import run

    setup = setup_from(args)
    check_techniques(setup, args.techniques)
    if args.record:
        commit = baselines.git_commit(allow_dirty=args.allow_dirty)  # refuse before measuring
    else:
        try:
            commit = baselines.git_commit(allow_dirty=True)
        except ValueError:
            commit = "unknown"
    record = run(setup, args.techniques, commit=commit)
    if args.record and not record["techniques"]:
        raise ValueError("--record needs at least one technique besides dense")
    results = setup.output / "results.json"
    report = write_report(results, setup.output / "report")
    print(run_summary(read_json(results), Target.load(), NOISE_LIMIT, report))
    print(f"results: {results}, {setup.output / 'results.csv'}, "
          f"{setup.output / 'speedups.png'}")
    if args.record:
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


def split_line(setup: Setup) -> str:
    return f"quality scored on the {setup.quality_split} split"


def cmd_measure(args: argparse.Namespace) -> int:
    from bench.baselines import Target
    from bench.console import knobs_lines, stats_table, table
    from bench.pipeline import Bench

    setup = setup_from(args)
    knobs = dict(args.knob or [])
    check_knobs(setup, args.technique, [knobs])
    row = Bench(setup).measure(args.technique, knobs)
    target = Target.load()
    rows = [row.to_dict()]
    print(table(rows, target.counts, target.quality_budget))
    print(stats_table(rows))
    if knobs:
        print(knobs_lines({row.technique: knobs}))
    print(split_line(setup))
    if row.noise_warning:
        print(f"warning: {row.noise_warning}")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from bench.baselines import Target
    from bench.console import knobs_lines, stats_table, table
    from bench.run import sweep

    setup = setup_from(args)
    knob, values = args.knob
    fixed = dict(args.set or [])
    check_knobs(setup, args.technique, [{**fixed, knob: v} for v in values])
    df, path = sweep(setup, args.technique, knob, values, fixed)
    target = Target.load()
    rows = df.to_dict("records")
    print(table(rows, target.counts, target.quality_budget, label=knob))
    print(stats_table(rows, label=knob))
    if fixed:
        print(knobs_lines({f"{args.technique}, fixed": fixed}))
    print(split_line(setup))
    print(f"\nwritten: {path}.csv and {path}.json")
    return 0


def cmd_baseline(args: argparse.Namespace) -> int:
    from bench import baselines
    from bench.pipeline import Bench
    from bench.run import measure_all

    root = args.baselines or baselines.BASELINES
    target = baselines.Target.load(root if (root / "target.json").is_file() else
                                   baselines.BASELINES)
    setup = setup_from(args)
    check_techniques(setup, args.techniques)
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


def add_technique_knobs(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--knob", dest="technique_knobs", type=parse_technique_setting,
                        action="append", metavar="TECHNIQUE.KNOB=VALUE",
                        help="measure TECHNIQUE with KNOB at VALUE instead of its default "
                             "(repeatable; a knob chosen with `bk-bench tune`); the setup, "
                             "and so a record, names every knob set")


def add_allow_dirty(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--allow-dirty", action="store_true",
                        help="record from a working tree with uncommitted changes, as commit "
                             "'<sha>-dirty' (otherwise refused)")


def run_plugin(module: str, args: argparse.Namespace) -> int:
    return importlib.import_module(module).run(args)


def build_parser(plugins: Iterable[str] | None = None) -> argparse.ArgumentParser:
    """The command's parser. ``plugins``: the plugin commands whose options are added (their
    modules imported); the others are listed without options. ``None``: every plugin."""
    parser = Parser(
        prog="bk-bench",
        description="Honest speedups, quality deltas and correctness for adaptive-computation "
                    "language models built on ResNet-BK.",
        epilog=f"{EXIT_CODES}\n\n{KNOBS_HELP}",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="the main job: train, measure and report every technique",
                       description="Train the dense model, fine-tune and measure every "
                                   "technique at its default knobs (or those set with --knob), "
                                   "print the table and write results, speedups.png and the "
                                   "HTML report (OUTPUT/report).")
    add_setup_arguments(p)
    p.add_argument("--techniques", nargs="+", help="only these registered techniques")
    add_technique_knobs(p)
    p.add_argument("--record", action="store_true",
                   help="also write these measurements as this commit's baseline record")
    add_allow_dirty(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("train", help="train (or load) the dense baseline and score it")
    add_setup_arguments(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("techniques", help="list the techniques and their knobs",
                       description="Each registered technique with its knobs: type, default, "
                                   "valid values and meaning.")
    p.add_argument("names", nargs="*", metavar="TECHNIQUE", help="only these (default: all)")
    p.set_defaults(func=cmd_techniques)

    p = sub.add_parser("measure", help="measure one technique against the dense baseline",
                       epilog=KNOBS_HELP)
    p.add_argument("technique")
    p.add_argument("--knob", type=parse_setting, action="append", metavar="NAME=VALUE",
                   help="a knob value (repeatable); checked before anything trains")
    add_setup_arguments(p)
    add_split_argument(p, "test")
    p.set_defaults(func=cmd_measure)

    p = sub.add_parser("sweep", help="measure a technique at each value of one knob",
                       epilog=KNOBS_HELP)
    p.add_argument("technique")
    p.add_argument("--knob", type=parse_values, required=True, metavar="NAME=V1,V2,...",
                   help="the knob and its values; every value is checked before anything "
                        "trains")
    p.add_argument("--set", type=parse_setting, action="append", metavar="NAME=VALUE",
                   help="other knobs held fixed")
    add_setup_arguments(p)
    add_split_argument(p, "test")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("baseline", help="record or check the per-commit baseline")
    p.add_argument("action", choices=["record", "check"])
    p.add_argument("--techniques", nargs="+", help="only these registered techniques")
    add_technique_knobs(p)
    p.add_argument("--tolerance", type=fraction,
                   help="relative speedup drop that fails the check (default: target.json)")
    p.add_argument("--baselines", type=Path,
                   help="folder with target.json and records/ (default: the repository's "
                        "baselines/)")
    add_allow_dirty(p)
    add_setup_arguments(p)
    p.set_defaults(func=cmd_baseline)

    for name, (module, help_text) in PLUGINS.items():
        if importlib.util.find_spec(module) is None:  # an optional plugin that is not there
            continue
        p = sub.add_parser(name, help=help_text, epilog=PLUGIN_EPILOGS.get(name))
        p.set_defaults(func=functools.partial(run_plugin, module))
        if plugins is None or name in plugins:
            importlib.import_module(module).add_arguments(p)
    return parser


def _out_of_memory(err: BaseException) -> bool:
    torch = sys.modules.get("torch")  # imported by every command that can run out of memory
    if isinstance(err, MemoryError) or (torch is not None
                                        and isinstance(err, torch.OutOfMemoryError)):
        return True
    text = str(err).lower()
    return isinstance(err, RuntimeError) and any(
        m in text for m in ("can't allocate memory", "out of memory", "not enough memory"))


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
    argv = sys.argv[1:] if argv is None else list(argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser([command] if command in PLUGINS else []).parse_args(argv)

    from bench.measure import timing_process

    timing_process()
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
