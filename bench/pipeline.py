"""Train (or reuse) the dense reference and each technique, then measure them.

A technique is fine-tuned from the trained dense model; its reference is the dense model
fine-tuned for the same steps with the same schedule (the "dense control"), so a quality delta
never mistakes extra training for a property of the technique.

Checkpoints are cached under ``<output>/checkpoints`` keyed by everything that determines them
(corpus, model and training settings, technique and knobs), so `run`, `sweep`, `baseline` and
`tune` share trained models instead of retraining.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bench.measure import Comparison, Workload, compare
from bench.registry import REFERENCE, Technique, get
from bk.data import Corpus, load_corpus
from bk.model import LanguageModel, ModelConfig
from bk.train import Evaluation, TrainConfig, evaluate, load_model, train


@dataclass(frozen=True)
class Setup:
    """Everything a measurement depends on besides the code."""

    corpus: str = "shakespeare"
    steps: int = 1500
    batch_size: int = 32
    seq_len: int = 128
    seed: int = 0
    rounds: int = 3  # passes over the workload, timed interleaved batch by batch
    workload_batches: int | None = None  # None: the whole test split
    quality_batches: int | None = None  # None: the whole test split
    output: Path = Path("runs")
    progress: bool = True

    @classmethod
    def quick(cls, **overrides: Any) -> Setup:
        """A small version that runs in a few minutes: short training, part of the test split."""
        return replace(cls(steps=300, rounds=12, workload_batches=6, quality_batches=30),
                       **overrides)

    def train_config(self, steps: int | None = None) -> TrainConfig:
        return TrainConfig(steps=self.steps if steps is None else steps,
                           batch_size=self.batch_size, seed=self.seed)

    def model_config(self, corpus: Corpus, **overrides: Any) -> ModelConfig:
        return ModelConfig(vocab_size=len(corpus.vocab), n_seq=self.seq_len, **overrides)

    def describe(self) -> dict[str, Any]:
        described = asdict(self)
        described["output"] = str(self.output)
        del described["progress"]
        return described


@functools.cache
def code_fingerprint() -> str:
    """A hash of the model code and the technique registrations: a checkpoint trained by other
    code is never reused."""
    root = Path(__file__).resolve().parent.parent
    digest = hashlib.sha256()
    sources = [*(root / "bk").rglob("*.py"), *(root / "bench" / "techniques").glob("*.py")]
    for path in sorted(sources):
        digest.update(path.relative_to(root).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def _key(*parts: Any) -> str:
    text = json.dumps([code_fingerprint(), *parts], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


class Bench:
    """Trained models and workloads for one ``Setup``, built lazily and cached on disk."""

    def __init__(self, setup: Setup) -> None:
        self.setup = setup
        self.corpus = load_corpus(setup.corpus)
        self._workload: Workload | None = None
        self._dense: LanguageModel | None = None
        self._loaded: dict[Path, nn.Module] = {}  # fine-tuned models, loaded once per Bench
        self._quality: dict[int, Evaluation] = {}  # by id() of a model this Bench holds

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

    def dense(self) -> LanguageModel:
        if self._dense is None:
            config = self.setup.model_config(self.corpus)
            train_config = self.setup.train_config()
            key = _key(self.setup.corpus, asdict(config), asdict(train_config))
            path = self.checkpoints / f"dense-{key}.pt"
            if path.exists():
                model, _ = load_model(path)
            else:
                torch.manual_seed(self.setup.seed)  # initial weights: same seed, same model
                model = LanguageModel(config)
                train(model, self.corpus, train_config, checkpoint=path,
                      progress=self.setup.progress, desc="train dense",
                      meta={"technique": REFERENCE})
            self._dense = model
        return self._dense

    def _finetuned(self, name: str, build: Callable[[ModelConfig], nn.Module], steps: int,
                   knobs: dict[str, Any],
                   schedule: Callable[[nn.Module, float], None] | None) -> nn.Module:
        """``build`` initialised from the trained dense model and trained ``steps`` more steps."""
        dense = self.dense()
        train_config = self.setup.train_config(steps)
        key = _key(self.setup.corpus, asdict(dense.cfg), asdict(self.setup.train_config()),
                   name, knobs, asdict(train_config))
        path = self.checkpoints / f"{name}-{key}.pt"
        if path not in self._loaded:
            self._loaded[path] = self._train_or_load(path, build, steps, train_config, name,
                                                     knobs, schedule)
        return self._loaded[path]

    def _train_or_load(self, path: Path, build: Callable[[ModelConfig], nn.Module], steps: int,
                       train_config: TrainConfig, name: str, knobs: dict[str, Any],
                       schedule: Callable[[nn.Module, float], None] | None) -> nn.Module:
        if path.exists():
            model, _ = load_model(path, build)
            return model
        dense = self.dense()
        torch.manual_seed(self.setup.seed)  # the technique's new parameters
        model = build(dense.cfg)
        unexpected = model.load_state_dict(dense.state_dict(), strict=False).unexpected_keys
        if unexpected:
            raise ValueError(f"technique {name!r} does not accept the dense weights "
                             f"{unexpected}; keep the dense parameter names")

        def on_step(step: int, m: nn.Module) -> None:
            if schedule is not None:
                schedule(m, step / max(1, steps))

        train(model, self.corpus, train_config, checkpoint=path, progress=self.setup.progress,
              desc=f"fine-tune {name}", on_step=on_step,
              meta={"technique": name, "knobs": knobs})
        if schedule is not None:
            schedule(model, 1.0)
        model.eval()
        return model

    def finetune_steps(self, technique: Technique) -> int:
        return round(self.setup.steps * technique.finetune_fraction)

    def candidate(self, technique: Technique | str,
                  knobs: Mapping[str, Any] | None = None) -> nn.Module:
        """The technique fine-tuned from the trained dense model (cached on disk)."""
        technique = get(technique) if isinstance(technique, str) else technique
        if technique.name == REFERENCE:
            return self.dense()
        values = technique.resolve(knobs)
        return self._finetuned(technique.name, lambda config: technique.build(config, values),
                               self.finetune_steps(technique), values, technique.schedule)

    def reference(self, technique: Technique | str) -> LanguageModel:
        """The dense model trained exactly as long as the technique: its fine-tuning steps
        continue the dense model too, so extra training is never credited to a technique."""
        technique = get(technique) if isinstance(technique, str) else technique
        steps = self.finetune_steps(technique)
        if technique.name == REFERENCE or steps == 0 or not technique.updates_weights:
            return self.dense()
        return self._finetuned(f"{REFERENCE}-control", LanguageModel, steps, {}, None)

    def measure(self, technique: Technique | str,
                knobs: Mapping[str, Any] | None = None) -> Comparison:
        technique = get(technique) if isinstance(technique, str) else technique
        candidate, reference = self.candidate(technique, knobs), self.reference(technique)
        comparison = compare(technique.name, reference, candidate, self.workload,
                             rounds=self.setup.rounds)
        comparison.quality_reference = self.quality(reference)
        comparison.quality_candidate = self.quality(candidate)
        return comparison

    def quality(self, model: nn.Module) -> Evaluation:
        """Test-split quality of a model this Bench holds, evaluated once (the dense control is
        the reference of most techniques)."""
        if id(model) not in self._quality:
            self._quality[id(model)] = evaluate(model, self.corpus, "test",
                                                max_batches=self.setup.quality_batches)
        return self._quality[id(model)]
