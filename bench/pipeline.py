"""Train (or reuse) the dense reference and each technique, then measure them.

A technique is fine-tuned from the trained dense model; its reference is the dense model
fine-tuned for the same steps with the same schedule (the "dense control"), so a quality delta
never mistakes extra training for a property of the technique. With ``Setup.start`` "scratch"
a technique that trains weights is trained from random initialisation instead, for the dense
model's steps with its schedule and batches, and its reference is the dense model itself: the
same training, one architecture against the other. Quality is scored on the test
split, except where knobs are being chosen (``bk-bench tune``): there it is scored on the
validation split, so that the test split that reports the choice did not make it.

Checkpoints are cached under ``<output>/checkpoints``, keyed by everything that determines
them (``Bench.request``): the corpus's content (``Corpus.fingerprint``), the model and training
settings, the technique and its knobs, the model it starts from, and the code it runs
(``code_fingerprint``: the modules defining the model's class, every ``bk`` module they import,
and the training code, docstrings and comments ignored). So `run`, `sweep`, `baseline` and
`tune` share trained models, an edit retrains exactly the models whose code it touches, and a
cached checkpoint is checked against its request before it is used: a stale or damaged one is
trained again, with a note on stderr. A lock per checkpoint makes a second process wait for the
first one's model instead of training it again.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import inspect
import json
import math
import os
import sys
import types
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bench.baselines import Target
from bench.ceilings import makes_decisions, realised_ceilings
from bench.files import locked
from bench.measure import Workload, compare
from bench.progress import Phase, Progress
from bench.registry import REFERENCE, Technique, get
from bench.rows import PATTERNS, Row
from bk.data import SPLITS, Corpus, load_corpus
from bk.model import SCALES, LanguageModel, ModelConfig
from bk.train import (
    Evaluation,
    TrainConfig,
    evaluate,
    evaluation_batches,
    load_checkpoint,
    load_weights,
    train,
)

TRAINING_CODE = ("bk.train", "bk.data")  # every model's key covers these
CONTROL = f"{REFERENCE}-control"
CHECKPOINT_EVERY = 100  # training steps between the periodic checkpoints of a training
CORES = os.cpu_count() or 1


@dataclass(frozen=True)
class ScaleSettings:
    """How a run at one model scale (``bk.model.SCALES``) trains and measures by default."""

    steps: int  # dense training steps
    finetune_factor: float  # multiplies every technique's finetune_fraction
    workload_batches: int | None  # test batches timed (None: the whole test split)
    rounds: int  # passes over the timed batches
    quality_batches: int | None  # test batches scored (None: the whole test split)
    ceiling_batches: int  # of the timed batches, those the ceilings are timed on
    train_threads: int  # torch threads while training (timing always runs on one)


# Chosen so that `bk-bench run --scale S` (every technique, shakespeare, 32 x 128 batches) fits
# its budget on a 2-core machine. tiny: about 0.1 s per training step, the whole test split
# (124 batches) timed. small (d_model 256, 8 layers): about 0.6 s per training step on two
# threads and 0.4 s per forward pass of a batch on one; 1500 dense steps (test 2.40 bits/char
# against tiny's 2.65), fine-tuning at two thirds of each technique's fraction (0.3 -> 0.2: 300
# steps), 40 timed batches x 3 passes and quality on the whole test split, within the two-hour
# budget (docs/scales.md has the measured time). base (d_model 512) costs about four times
# small per token: an overnight run.
SCALE_SETTINGS: dict[str, ScaleSettings] = {
    "tiny": ScaleSettings(steps=1500, finetune_factor=1.0, workload_batches=None, rounds=3,
                          quality_batches=None, ceiling_batches=20, train_threads=1),
    "small": ScaleSettings(steps=1500, finetune_factor=2 / 3, workload_batches=40, rounds=3,
                           quality_batches=None, ceiling_batches=6, train_threads=min(2, CORES)),
    "base": ScaleSettings(steps=2000, finetune_factor=2 / 3, workload_batches=20, rounds=3,
                          quality_batches=None, ceiling_batches=4, train_threads=min(2, CORES)),
}
QUICK = {"steps": 300, "rounds": 12, "workload_batches": 6, "quality_batches": 30,
         "ceiling_batches": 2}


QUALITY_SPLITS = tuple(split for split in SPLITS if split != "train")
# Where a technique's training starts (Setup.start): the trained dense model, fine-tuned against
# the dense control; or random initialisation, trained the dense model's steps against it.
STARTS = ("dense", "scratch")


@dataclass(frozen=True)
class Setup:
    """Everything a measurement depends on besides the code. ``Setup.at_scale`` gives a scale's
    defaults (``SCALE_SETTINGS``); the field defaults are tiny's."""

    corpus: str = "shakespeare"
    scale: str = "tiny"
    steps: int = 1500
    finetune_factor: float = 1.0
    batch_size: int = 32
    seq_len: int = 128
    seed: int = 0
    rounds: int = 3  # passes over the workload, timed interleaved batch by batch
    workload_batches: int | None = None  # None: the whole test split
    quality_batches: int | None = None  # None: the whole test split
    ceiling_batches: int = 20
    train_threads: int = 1
    distill: float = 0.0  # weight of KL(dense || technique) while fine-tuning (bk.train)
    quality_split: str = "test"  # where quality is scored: "valid" while choosing knobs
    start: str = "dense"  # where each technique's training starts (STARTS, Bench.from_scratch)
    # Knobs set for whole runs (run, baseline), by technique; the others stay at their defaults.
    knobs: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    output: Path = Path("runs")
    progress: bool = True

    def __post_init__(self) -> None:
        if self.scale not in SCALES:
            raise ValueError(f"unknown scale {self.scale!r}; expected one of {', '.join(SCALES)}")
        if not (self.distill >= 0 and math.isfinite(self.distill)):
            raise ValueError(f"invalid Setup: distill {self.distill!r}; expected a finite "
                             "weight >= 0")
        if not self.finetune_factor > 0 or self.train_threads < 1 or self.ceiling_batches < 1:
            raise ValueError(f"invalid Setup: finetune_factor {self.finetune_factor} (> 0), "
                             f"train_threads {self.train_threads} and ceiling_batches "
                             f"{self.ceiling_batches} (>= 1)")
        if self.start not in STARTS:
            raise ValueError(f"invalid Setup: start {self.start!r}; expected one of "
                             f"{', '.join(STARTS)}")
        if self.quality_split not in QUALITY_SPLITS:
            raise ValueError(f"invalid Setup: quality_split {self.quality_split!r}; expected "
                             f"one of {', '.join(QUALITY_SPLITS)} (the training split cannot "
                             f"score a model trained on it)")
        if not (isinstance(self.knobs, Mapping) and all(
                isinstance(name, str) and isinstance(values, Mapping)
                and all(isinstance(knob, str) for knob in values)
                for name, values in self.knobs.items())):
            raise ValueError(f"invalid Setup: knobs {self.knobs!r}; expected knob values by "
                             "technique, {technique: {knob: value}}")
        object.__setattr__(self, "knobs", {name: dict(values) for name, values
                                           in sorted(self.knobs.items()) if values})

    @classmethod
    def at_scale(cls, scale: str = "tiny", **overrides: Any) -> Setup:
        """The defaults of ``scale`` (``SCALE_SETTINGS``) with ``overrides``."""
        if scale not in SCALE_SETTINGS:
            raise ValueError(f"unknown scale {scale!r}; expected one of "
                             f"{', '.join(SCALE_SETTINGS)}")
        return cls(scale=scale, **{**asdict(SCALE_SETTINGS[scale]), **overrides})

    @classmethod
    def quick(cls, scale: str = "tiny", **overrides: Any) -> Setup:
        """A small version that runs in a few minutes (at tiny): short training, part of the
        test split."""
        return cls.at_scale(scale, **{**QUICK, **overrides})

    def train_config(self, steps: int | None = None, distill: float = 0.0) -> TrainConfig:
        return TrainConfig(steps=self.steps if steps is None else steps,
                           batch_size=self.batch_size, seed=self.seed,
                           threads=self.train_threads, distill=distill)

    def model_config(self, corpus: Corpus, **overrides: Any) -> ModelConfig:
        return ModelConfig.at_scale(self.scale, vocab_size=len(corpus.vocab), n_seq=self.seq_len,
                                    **overrides)

    def finetune_steps(self, technique: Technique) -> int:
        """A technique's fine-tuning steps: its fraction of the dense steps, times the scale's
        factor."""
        return round(self.steps * technique.finetune_fraction * self.finetune_factor)

    def describe(self) -> dict[str, Any]:
        """The settings of a measurement, and the output folder (which does not change it)."""
        described = asdict(self)
        described["output"] = str(self.output)
        del described["progress"]
        return described


# ----------------------------------------------------------------------------- code fingerprints

BK_ROOT = Path(__file__).resolve().parent.parent / "bk"


def module_file(name: str) -> Path:
    """The source file of an importable module (``bk`` modules by their path in this tree)."""
    if name == "bk" or name.startswith("bk."):
        base = BK_ROOT.parent.joinpath(*name.split("."))
        for candidate in (base.with_suffix(".py"), base / "__init__.py"):
            if candidate.is_file():
                return candidate
        raise ValueError(f"module {name} has no source file under {BK_ROOT}")
    module = sys.modules.get(name)
    source = getattr(module, "__file__", None)
    if source is None or not Path(source).is_file():
        raise ValueError(f"the source of module {name!r} cannot be found, so a checkpoint of a "
                         "model defined there cannot be keyed by its code")
    return Path(source)


@functools.cache
def read_source(name: str) -> str:
    """A module's source, read once per process (the code that runs is the code imported)."""
    return module_file(name).read_text(encoding="utf-8")


def _is_module(name: str) -> bool:
    try:
        module_file(name)
    except ValueError:
        return False
    return True


@functools.lru_cache(maxsize=256)
def _bk_imports(name: str, source: str) -> frozenset[str]:
    """The ``bk`` modules a module imports (absolute or relative, at any depth in its body)."""
    package = name if module_file(name).name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1])
                base = f"{base}.{node.module}" if node.module else base
            else:
                base = node.module or ""
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names
                         if _is_module(f"{base}.{alias.name}"))
    return frozenset(m for m in found if m == "bk" or m.startswith("bk."))


class _NoDocstrings(ast.NodeTransformer):
    """Drops statements that are bare string constants (docstrings and string comments)."""

    def visit_Expr(self, node: ast.Expr) -> ast.AST | None:
        if isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            return None
        return node


@functools.lru_cache(maxsize=256)
def _normalised(source: str) -> str:
    """A hash of the AST without docstrings or positions: comment, docstring and layout edits
    leave it unchanged; any change to what the code does changes it."""
    tree = _NoDocstrings().visit(ast.parse(source))
    dumped = ast.dump(tree, annotate_fields=False, include_attributes=False)
    return hashlib.sha256(dumped.encode()).hexdigest()


def dependencies(roots: Iterable[str], read: Callable[[str], str] | None = None) -> list[str]:
    """``roots``, their parent packages and every ``bk`` module they import, transitively
    (sources from ``read``, by default ``read_source``)."""
    read = read or read_source
    seen: set[str] = set()
    pending = list(roots)
    while pending:
        name = pending.pop()
        if name in seen:
            continue
        seen.add(name)
        parent = name.rpartition(".")[0]
        if parent:
            pending.append(parent)
        pending.extend(_bk_imports(name, read(name)) - seen)
    return sorted(seen)


def model_modules(model_class: type) -> list[str]:
    """The modules defining ``model_class`` and its bases (up to ``nn.Module``)."""
    return sorted({cls.__module__ for cls in model_class.__mro__
                   if cls.__module__ != "builtins" and not cls.__module__.startswith("torch")})


def code_fingerprint(model_class: type, read: Callable[[str], str] | None = None) -> str:
    """A hash of the code a model of ``model_class`` depends on: the modules defining it and
    its bases, the ``bk`` modules they import (transitively) and the training code, each
    compared as a docstring-free AST."""
    read = read or read_source
    digest = hashlib.sha256()
    for name in dependencies([*model_modules(model_class), *TRAINING_CODE], read):
        digest.update(f"{name}\n{_normalised(read(name))}\n".encode())
    return digest.hexdigest()[:16]


def callable_fingerprint(fn: Callable[..., Any] | None) -> str | None:
    """A hash of a function's bytecode and constants and of the module-level functions it
    calls from its own module (a technique's ``build`` maps knobs to constructor arguments, so
    it determines the model as much as the class does). Classes are covered by
    ``code_fingerprint``; docstrings and line numbers are left out."""
    if fn is None or inspect.isclass(fn):
        return None
    digest = hashlib.sha256()
    seen: set[int] = set()

    def feed(code: types.CodeType, namespace: dict[str, Any], module: str, doc: str | None
             ) -> None:
        digest.update(code.co_code)
        for const in code.co_consts:
            if isinstance(const, types.CodeType):
                feed(const, namespace, module, None)
            elif not (doc is not None and const == doc):
                digest.update(repr(const).encode())
        digest.update(repr(code.co_names).encode())
        for name in code.co_names:
            target = namespace.get(name)
            if (inspect.isfunction(target) and target.__module__ == module
                    and id(target) not in seen):
                seen.add(id(target))
                feed(target.__code__, target.__globals__, module, target.__doc__)

    function = getattr(fn, "__func__", fn)
    if not inspect.isfunction(function):
        raise ValueError(f"cannot fingerprint {fn!r}: expected a function or a class")
    feed(function.__code__, function.__globals__, function.__module__, function.__doc__)
    return digest.hexdigest()[:16]


def request_key(request: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(request, sort_keys=True).encode()).hexdigest()[:12]


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def _differences(saved: Mapping[str, Any], wanted: Mapping[str, Any]) -> list[str]:
    return [f"{k}: {saved.get(k)!r} in the file, {wanted.get(k)!r} requested"
            for k in sorted(set(saved) | set(wanted)) if saved.get(k) != wanted.get(k)]


def note(message: str) -> None:
    print(f"bk-bench: {message}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- the bench

def axis_variants(technique: Technique, knobs: Mapping[str, Any] | None = None
                  ) -> dict[str, dict[str, Any]]:
    """The axes (``Technique.axes``) that its defaults, with ``knobs`` set, switch on, each with
    those knobs and the ones that switch the axis off. An axis already switched off has no
    variant: it would be the technique itself."""
    knobs = dict(knobs or {})
    values = technique.resolve(knobs)
    return {axis: {**knobs, **off} for axis, off in technique.axes.items()
            if any(values[knob] != value for knob, value in off.items())}


def training_phase(label: str, scratch: bool) -> str:
    """The phase that trains the model ``label`` from the dense model or from scratch."""
    return f"{'train' if scratch else 'fine-tune'} {label}"


def axis_label(name: str, axis: str) -> str:
    return f"{name} without {axis}"


@dataclass(frozen=True)
class Plan:
    """One cached model: where it lives and everything that determines it."""

    name: str
    path: Path
    request: dict[str, Any]
    train_config: TrainConfig

    @property
    def key(self) -> str:
        return request_key(self.request)


class Bench:
    """Trained models and workloads for one ``Setup``, built lazily and cached on disk.

    With ``progress`` (a ``Progress`` over the phases of ``job``), each training, timing,
    evaluation and ceiling runs as its phase; a model served from the cache skips its phase.
    """

    def __init__(self, setup: Setup, corpus: Corpus | None = None, *,
                 target: Target | None = None, progress: Progress | None = None) -> None:
        """``corpus``: ``setup.corpus`` already loaded (loaded here when not given);
        ``target``: whose quality budget decides if a row counts (default: the repository's)."""
        self.setup = setup
        self.corpus = load_corpus(setup.corpus) if corpus is None else corpus
        self.progress = progress
        self._target = target
        self._workload: Workload | None = None
        self._dense: LanguageModel | None = None
        self._dense_plan: Plan | None = None
        self._loaded: dict[str, nn.Module] = {}  # fine-tuned models, loaded once per Bench
        self._quality: dict[int, Evaluation] = {}  # by id() of a model this Bench holds

    @property
    def target(self) -> Target:
        if self._target is None:
            self._target = Target.load()
        return self._target

    @property
    def checkpoints(self) -> Path:
        return self.setup.output / "checkpoints"

    @property
    def workload(self) -> Workload:
        if self._workload is None:
            self._workload = Workload.from_corpus(
                self.corpus, batch_size=self.setup.batch_size, seq_len=self.setup.seq_len,
                max_batches=self.setup.workload_batches)
        return self._workload

    @property
    def ceiling_workload(self) -> Workload:
        """The first ``ceiling_batches`` timed batches: where ceilings are timed."""
        batches = self.workload.batches[:self.setup.ceiling_batches]
        return Workload(f"{self.workload.name} (first {len(batches)})", batches)

    # -- progress ---------------------------------------------------------------------------

    @contextmanager
    def _phase(self, name: str | None) -> Iterator[Callable[[int], None]]:
        """Run the job's phase ``name``; without a job (or a name), nothing is reported."""
        if self.progress is None or name is None:
            yield lambda n=1: None
        else:
            with self.progress.phase(name) as advance:
                yield advance

    def job(self, names: Iterable[str], ceilings: bool = True, axes: bool = False
            ) -> list[Phase]:
        """The phases ``measure`` runs for the techniques ``names`` (at the setup's knobs),
        after ``dense`` and ``quality(dense)``, and with ``axes`` those of each technique with
        each of its axes off (``axis_variants``); trainings whose checkpoints exist are marked
        skipped (entering one that turns out stale runs it after all)."""
        steps_left = self.setup.train_config().steps
        phases = [Phase(f"train {REFERENCE}", steps_left, "train",
                        skipped=self.dense_plan().path.exists())]
        evaluate_batches = evaluation_batches(self.corpus, self.setup.quality_split,
                                              seq_len=self.setup.seq_len,
                                              max_batches=self.setup.quality_batches)
        rounds = self.setup.rounds * len(self.workload.batches)
        ceiling_rounds = len(PATTERNS) * self.setup.rounds * len(self.ceiling_workload.batches)
        timing = ("train", 2 / 3)  # a timed round: two forward passes, a third of a step each
        evaluations, tail = [REFERENCE], []
        measured = [(name, None, name) for name in names]
        if axes:
            measured += [(name, knobs, axis_label(name, axis)) for name in names
                         for axis, knobs in axis_variants(get(name),
                                                          self.setup.knobs.get(name)).items()]
        for name, knobs, label in measured:
            technique = get(name)
            reference = self.reference_name(technique)
            decides = False
            for model in (reference, label):
                phase = self._training_phase(model, technique)
                if model != REFERENCE and all(p.name != phase for p in phases):
                    plan, first = self._plan_of(model, technique, knobs)
                    phases.append(Phase(phase, plan.train_config.steps, "train",
                                        skipped=plan.path.exists()))
                    decides = decides or (model == label and makes_decisions(first))
            tail.append(Phase(f"measure {label}", rounds, "measure", "rounds",
                              priced_like=timing))
            evaluations += [m for m in (reference, label) if m not in evaluations]
            if ceilings and decides and knobs is None:
                tail.append(Phase(f"ceilings {label}", ceiling_rounds, "ceiling", "rounds",
                                  priced_like=("measure", 1.0)))
        phases += [Phase(f"quality {m}", evaluate_batches, "evaluate", "batches",
                         priced_like=("train", 1 / 3)) for m in evaluations]
        for phase in phases:
            if phase.skipped:
                phase.done = phase.units
        return phases + tail

    def _training_phase(self, model: str, technique: Technique) -> str:
        """The phase that trains ``model`` (the control, or ``technique`` under a label)."""
        return training_phase(model, model != CONTROL and self.from_scratch(technique))

    def _plan_of(self, model: str, technique: Technique,
                 knobs: Mapping[str, Any] | None = None) -> tuple[Plan, nn.Module]:
        if model == CONTROL:
            return self._finetune_plan(CONTROL, LanguageModel, self.finetune_steps(technique),
                                       {}, ())
        values = self.knobs(technique, knobs)
        return self._finetune_plan(technique.name,
                                   lambda config: technique.build(config, values),
                                   self.training_steps(technique), values,
                                   (technique.build, technique.schedule),
                                   self.from_scratch(technique))

    # -- models -----------------------------------------------------------------------------

    def plan(self, name: str, model_class: type, config: ModelConfig, train_config: TrainConfig,
             knobs: Mapping[str, Any], parent: Plan | None = None,
             code: Iterable[Callable[..., Any] | None] = (), scratch: bool = False) -> Plan:
        """The cache entry of a model: its file is named by a hash of ``request``. ``parent``
        is the model it starts from, or with ``scratch`` the teacher it distils from (if any):
        a request from scratch says so, the others keep the keys they always had."""
        request = _jsonable({
            "model": name,
            "class": f"{model_class.__module__}.{model_class.__qualname__}",
            "code": code_fingerprint(model_class),
            "build": [callable_fingerprint(fn) for fn in code],
            "corpus": self.corpus.fingerprint,
            "config": asdict(config),
            "train": asdict(train_config),
            "knobs": dict(knobs),
            "parent": None if parent is None else parent.key,
            "torch": torch.__version__,
            "python": list(sys.version_info[:2]),
        })
        if scratch:
            request["start"] = "scratch"
        return Plan(name, self.checkpoints / f"{name}-{request_key(request)}.pt", request,
                    train_config)

    def dense_plan(self) -> Plan:
        if self._dense_plan is None:
            self._dense_plan = self.plan(REFERENCE, LanguageModel,
                                         self.setup.model_config(self.corpus),
                                         self.setup.train_config(), {})
        return self._dense_plan

    def dense(self) -> LanguageModel:
        if self._dense is None:
            plan = self.dense_plan()

            def build() -> nn.Module:
                torch.manual_seed(self.setup.seed)  # initial weights: same seed, same model
                return LanguageModel(ModelConfig(**plan.request["config"]))

            def fit(model: nn.Module) -> None:
                self._train(model, plan, f"train {REFERENCE}",
                            meta={"technique": REFERENCE, "request": plan.request})

            self._dense = self._cached(plan, build, fit, f"train {REFERENCE}")
        return self._dense

    def _train(self, model: nn.Module, plan: Plan, phase: str, meta: dict[str, Any],
               on_step: Callable[[int, nn.Module], None] | None = None,
               teacher: nn.Module | None = None) -> None:
        """Train ``model`` as ``plan`` says, resuming from its periodic checkpoint if an earlier
        run was interrupted, reporting each step to the phase ``phase``; ``teacher`` for a plan
        that distils."""
        with self._phase(phase) as advance:
            last: list[int] = []

            def after_step(done: int) -> None:
                if not last and done > 1 and self.progress is not None:
                    self.progress.resume(phase, done - 1)  # steps an earlier run took
                advance(done - (last[0] if last else done - 1))
                last[:] = [done]

            train(model, self.corpus, plan.train_config, checkpoint=plan.path, resume=True,
                  progress=self.setup.progress and self.progress is None, desc=phase,
                  meta=meta, on_step=on_step, after_step=after_step,
                  checkpoint_every=CHECKPOINT_EVERY, teacher=teacher)

    def _cached(self, plan: Plan, build: Callable[[], nn.Module],
                fit: Callable[[nn.Module], None], phase: str) -> nn.Module:
        """The model of ``plan``: loaded from its checkpoint when that checks out against the
        request (its phase skipped), else built and trained (while holding the checkpoint's
        lock), resuming from the training's periodic checkpoint if there is one."""
        existed = plan.path.exists()
        with locked(plan.path, on_wait=lambda: note(
                f"waiting for another process to finish training {plan.path}")):
            model = build()
            if plan.path.exists():
                problem = self._load_into(model, plan)
                if problem is None:
                    if not existed:
                        note(f"reusing {plan.path}, trained by another process meanwhile")
                    if self.progress is not None:
                        self.progress.skip(phase)
                    return model.eval()
                note(f"{problem}; training it again")
                plan.path.unlink()
                model = build()
            fit(model)
        return model.eval()

    def _load_into(self, model: nn.Module, plan: Plan) -> str | None:
        """Load the checkpoint of ``plan`` into ``model``; the reason it cannot be used, if so."""
        try:
            saved = load_checkpoint(plan.path)
        except ValueError as err:
            return str(err)
        what = f"checkpoint {plan.path}"
        recorded = saved.meta.get("request")
        if not isinstance(recorded, dict):
            return f"{what} records no request (written by an older bk-bench)"
        if recorded != plan.request:
            return (f"{what} was trained for another request "
                    f"({'; '.join(_differences(recorded, plan.request))})")
        if asdict(saved.config) != plan.request["config"]:
            return f"{what} holds a model of config {asdict(saved.config)}, not the requested one"
        if saved.vocab != self.corpus.vocab:
            return f"{what} holds another vocabulary than corpus {self.corpus.name}'s"
        if saved.step != plan.train_config.steps:
            return f"{what} was trained {saved.step} steps, not {plan.train_config.steps}"
        try:
            load_weights(model, saved.model_state, what)
        except ValueError as err:
            return str(err)
        return None

    def _finetune_plan(self, name: str, build: Callable[[ModelConfig], nn.Module], steps: int,
                       knobs: dict[str, Any], code: Iterable[Callable[..., Any] | None],
                       scratch: bool = False) -> tuple[Plan, nn.Module]:
        """The plan of ``build`` fine-tuned ``steps`` steps from the dense model (or with
        ``scratch`` trained from its initialisation), and a freshly built model (its class
        tells which code the key covers). A technique distils from the dense model when
        ``Setup.distill`` says so; the dense control never does (it would learn from itself)."""
        config = self.setup.model_config(self.corpus)
        torch.manual_seed(self.setup.seed)  # the technique's new parameters (all, from scratch)
        first = build(config)
        distill = 0.0 if name == CONTROL else self.setup.distill
        parent = None if scratch and distill == 0 else self.dense_plan()
        return self.plan(name, type(first), config, self.setup.train_config(steps, distill),
                         knobs, parent, code, scratch), first

    def _finetuned(self, name: str, build: Callable[[ModelConfig], nn.Module], steps: int,
                   knobs: dict[str, Any],
                   schedule: Callable[[nn.Module, float], None] | None,
                   code: Iterable[Callable[..., Any] | None] = (),
                   label: str | None = None, scratch: bool = False) -> nn.Module:
        """``build`` initialised from the trained dense model and trained ``steps`` more steps,
        or with ``scratch`` trained ``steps`` steps from its own initialisation; its phase is
        ``fine-tune <label>`` (``train <label>`` from scratch; the name unless told)."""
        ident = json.dumps([name, knobs, steps, scratch], sort_keys=True, default=str)
        if ident not in self._loaded:
            plan, first = self._finetune_plan(name, build, steps, knobs, code, scratch)
            phase = training_phase(label or name, scratch)
            self._loaded[ident] = self._train_or_load(plan, first, build, name, knobs, schedule,
                                                      phase, scratch)
        return self._loaded[ident]

    def _train_or_load(self, plan: Plan, first: nn.Module,
                       build: Callable[[ModelConfig], nn.Module], name: str,
                       knobs: dict[str, Any],
                       schedule: Callable[[nn.Module, float], None] | None,
                       phase: str, scratch: bool = False) -> nn.Module:
        fresh = [first]

        def initial() -> nn.Module:
            if fresh:
                return fresh.pop()
            torch.manual_seed(self.setup.seed)
            return build(self.setup.model_config(self.corpus))

        def fit(model: nn.Module) -> None:
            dense = self.dense()
            if not scratch:
                unexpected = model.load_state_dict(dense.state_dict(),
                                                   strict=False).unexpected_keys
                if unexpected:
                    raise ValueError(f"technique {name!r} does not accept the dense weights "
                                     f"{unexpected}; keep the dense parameter names")
            steps = plan.train_config.steps

            def on_step(step: int, m: nn.Module) -> None:
                if schedule is not None:
                    schedule(m, step / max(1, steps))

            teacher = dense if plan.train_config.distill > 0 else None
            self._train(model, plan, phase, on_step=on_step, teacher=teacher,
                        meta={"technique": name, "knobs": knobs, "request": plan.request})

        model = self._cached(plan, initial, fit, phase)
        if schedule is not None:
            schedule(model, 1.0)  # the state training ends in, whether trained or loaded
        return model.eval()

    def finetune_steps(self, technique: Technique) -> int:
        return self.setup.finetune_steps(technique)

    def from_scratch(self, technique: Technique) -> bool:
        """Whether ``technique`` trains from random initialisation (``Setup.start`` "scratch"):
        a technique that trains weights does; one whose steps only calibrate
        (``updates_weights=False``) starts from the dense weights either way."""
        return (self.setup.start == "scratch" and technique.name != REFERENCE
                and technique.updates_weights)

    def training_steps(self, technique: Technique) -> int:
        """The steps ``technique`` trains: the dense model's from scratch, else its
        fine-tuning steps."""
        return self.setup.steps if self.from_scratch(technique) else self.finetune_steps(technique)

    def knobs(self, technique: Technique, knobs: Mapping[str, Any] | None = None
              ) -> dict[str, Any]:
        """Every knob of ``technique``: its defaults, then the setup's knobs for it, then
        ``knobs``, validated."""
        return technique.resolve({**self.setup.knobs.get(technique.name, {}), **(knobs or {})})

    def candidate(self, technique: Technique | str, knobs: Mapping[str, Any] | None = None,
                  label: str | None = None) -> nn.Module:
        """The technique fine-tuned from the trained dense model, or trained from scratch
        (``from_scratch``), cached on disk, at the setup's knobs with ``knobs`` set
        (``Bench.knobs``); ``label`` names its phase when it is not the technique at the
        setup's knobs (an axis off)."""
        technique = get(technique) if isinstance(technique, str) else technique
        if technique.name == REFERENCE:
            return self.dense()
        values = self.knobs(technique, knobs)
        return self._finetuned(technique.name, lambda config: technique.build(config, values),
                               self.training_steps(technique), values, technique.schedule,
                               code=(technique.build, technique.schedule), label=label,
                               scratch=self.from_scratch(technique))

    def reference_name(self, technique: Technique) -> str:
        """``dense``, or the dense control when the technique is fine-tuned, training weights
        for some steps (from scratch it trains the dense model's steps: the dense model is its
        control)."""
        if (technique.name == REFERENCE or self.finetune_steps(technique) == 0
                or not technique.updates_weights or self.from_scratch(technique)):
            return REFERENCE
        return CONTROL

    def reference(self, technique: Technique | str) -> LanguageModel:
        """The dense model trained exactly as long as the technique: its fine-tuning steps
        continue the dense model too, so extra training is never credited to a technique."""
        technique = get(technique) if isinstance(technique, str) else technique
        if self.reference_name(technique) == REFERENCE:
            return self.dense()
        return self._finetuned(CONTROL, LanguageModel, self.finetune_steps(technique), {}, None)

    def measure(self, technique: Technique | str, knobs: Mapping[str, Any] | None = None, *,
                ceilings: bool = False, label: str | None = None) -> Row:
        """The technique's row: timed against its reference, FLOPs and work counted, quality
        scored (``counts`` against ``target``); with ``ceilings``, its ceilings at the keep rate
        matching its measured work (``bench.ceilings.realised_ceilings``). ``label`` names the
        phases (the technique's name unless told)."""
        technique = get(technique) if isinstance(technique, str) else technique
        label = label or technique.name
        candidate = self.candidate(technique, knobs, label)
        reference = self.reference(technique)
        with self._phase(f"measure {label}") as advance:
            row = compare(technique.name, reference, candidate, self.workload,
                          scale=self.setup.scale, knobs=self.knobs(technique, knobs),
                          rounds=self.setup.rounds, after_round=advance)
        ref = self.quality(reference, self.reference_name(technique)).perplexity
        cand = self.quality(candidate, label).perplexity
        row = replace(row, reference_perplexity=ref, candidate_perplexity=cand,
                      quality_delta=cand / ref - 1, counts=self.target.counts(cand / ref - 1))
        if not ceilings:
            return row
        phase = f"ceilings {label}" if makes_decisions(candidate) else None
        with self._phase(phase) as advance:
            figures = realised_ceilings(candidate, reference, row, self.ceiling_workload,
                                        passes=self.setup.rounds, after_round=advance)
        return replace(row, **figures)

    def quality(self, model: nn.Module, name: str | None = None) -> Evaluation:
        """Quality of a model this Bench holds on ``Setup.quality_split``, evaluated once (the
        dense control is the reference of most techniques); ``name`` names its phase."""
        if id(model) not in self._quality:
            with self._phase(None if name is None else f"quality {name}") as advance:
                self._quality[id(model)] = evaluate(model, self.corpus, self.setup.quality_split,
                                                    max_batches=self.setup.quality_batches,
                                                    after_batch=advance)
        return self._quality[id(model)]
