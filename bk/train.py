"""Training, evaluation and checkpoints.

Training is AdamW with linear warm-up and cosine decay, gradient-norm clipping, seeded batches
and a resumable checkpoint. A checkpoint holds the model config, the vocabulary, the weights,
the optimiser and the step; it is written atomically and read with ``weights_only=True``.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from bk.data import Corpus, Vocabulary
from bk.model import LanguageModel, ModelConfig


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 1500
    batch_size: int = 32
    lr: float = 3e-3
    weight_decay: float = 0.01
    warmup: int = 100
    grad_clip: float = 1.0
    seed: int = 0
    eval_every: int = 0  # 0: evaluate on the validation split only at the end
    eval_batches: int = 20

    def __post_init__(self) -> None:
        if self.steps < 0 or self.batch_size < 1 or self.lr <= 0 or self.grad_clip <= 0:
            raise ValueError(f"invalid TrainConfig: {self}; expected steps >= 0, batch_size >= 1, "
                             "lr > 0 and grad_clip > 0")


@dataclass(frozen=True)
class Evaluation:
    split: str
    loss: float  # mean cross-entropy, nats per token
    tokens: int

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss)

    @property
    def bits_per_token(self) -> float:
        return self.loss / math.log(2)


@dataclass
class TrainResult:
    steps: int
    seconds: float
    history: list[dict[str, float]] = field(default_factory=list)


@torch.no_grad()
def evaluate(model: nn.Module, corpus: Corpus, split: str = "test", *, batch_size: int = 32,
             seq_len: int | None = None, max_batches: int | None = None) -> Evaluation:
    """Mean next-token cross-entropy over every target of ``split`` (or its first batches)."""
    seq_len = seq_len or model.cfg.n_seq
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i, (x, y) in enumerate(corpus.batches(split, batch_size, seq_len, drop_last=False)):
        if max_batches is not None and i >= max_batches:
            break
        out = model(x, y)
        total += float(out.ce) * y.numel()
        count += y.numel()
    model.train(was_training)
    if count == 0:
        raise ValueError(f"split {split!r} of corpus {corpus.name!r} has no tokens to evaluate")
    return Evaluation(split, total / count, count)


def learning_rate(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def train(model: nn.Module, corpus: Corpus, cfg: TrainConfig, *,
          checkpoint: Path | None = None, resume: bool = False, progress: bool = True,
          desc: str = "train", meta: dict[str, Any] | None = None,
          on_step: Callable[[int, nn.Module], None] | None = None) -> TrainResult:
    """Train ``model`` on ``corpus`` for ``cfg.steps`` steps; the objective is ``model(x, y).loss``.

    With ``resume`` and an existing ``checkpoint``, training continues from the saved step with
    the saved optimiser state. ``on_step(step, model)`` runs before each step (for schedules).
    """
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    start = 0
    if resume and checkpoint is not None and checkpoint.exists():
        saved = load_checkpoint(checkpoint)
        model.load_state_dict(saved.model_state)
        if saved.optimizer_state is not None:
            optimizer.load_state_dict(saved.optimizer_state)
        start = saved.step
    generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + start)
    # Batches come from ``generator``; the global generator drives any sampling inside the
    # model (Gumbel noise), so seeding it too makes a training run repeat exactly.
    torch.manual_seed(cfg.seed * 1_000_003 + start)
    model.train()
    result = TrainResult(steps=start, seconds=0.0)
    began = time.perf_counter()
    bar = tqdm(range(start, cfg.steps), desc=desc, disable=not progress, leave=False)
    for step in bar:
        if on_step is not None:
            on_step(step, model)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, cfg)
        x, y = corpus.random_batch("train", cfg.batch_size, model.cfg.n_seq, generator)
        out = model(x, y)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        result.steps = step + 1
        if step % 50 == 0 or step == cfg.steps - 1:
            bar.set_postfix(loss=f"{out.ce.item():.3f}")
            result.history.append({"step": step, "train_ce": out.ce.item()})
        if cfg.eval_every and (step + 1) % cfg.eval_every == 0:
            ev = evaluate(model, corpus, "valid", batch_size=cfg.batch_size,
                          max_batches=cfg.eval_batches)
            result.history.append({"step": step, "valid_ce": ev.loss})
            model.train()
    result.seconds = time.perf_counter() - began
    model.eval()
    if checkpoint is not None:
        save_checkpoint(checkpoint, model, corpus.vocab, step=result.steps,
                        optimizer=optimizer, meta=meta)
    return result


@dataclass
class Checkpoint:
    config: ModelConfig
    vocab: Vocabulary
    model_state: dict[str, torch.Tensor]
    optimizer_state: dict[str, Any] | None
    step: int
    meta: dict[str, Any]


def save_checkpoint(path: Path, model: nn.Module, vocab: Vocabulary, *, step: int,
                    optimizer: torch.optim.Optimizer | None = None,
                    meta: dict[str, Any] | None = None) -> None:
    """Write a checkpoint atomically (a temporary file renamed over the target)."""
    payload = {
        "format": "bk-checkpoint-1",
        "config": asdict(model.cfg),
        "vocab": {"tokens": list(vocab.tokens), "level": vocab.level},
        "model_state": model.state_dict(),
        "optimizer_state": optimizer.state_dict() if optimizer is not None else None,
        "step": step,
        "meta": meta or {},
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.close(fd)
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load_checkpoint(path: Path) -> Checkpoint:
    """Read a checkpoint; a missing, corrupt or foreign file raises ``ValueError``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for truncated or foreign files
        raise ValueError(f"checkpoint {path} is corrupt or not a torch file: {err}") from err
    if not isinstance(payload, dict) or payload.get("format") != "bk-checkpoint-1":
        raise ValueError(f"{path} is not a bk checkpoint (expected format 'bk-checkpoint-1')")
    try:
        config = ModelConfig(**payload["config"])
        vocab = Vocabulary(tuple(payload["vocab"]["tokens"]), payload["vocab"]["level"])
        return Checkpoint(config, vocab, payload["model_state"], payload["optimizer_state"],
                          int(payload["step"]), dict(payload["meta"]))
    except (KeyError, TypeError) as err:
        raise ValueError(f"checkpoint {path} is missing or has malformed fields: {err}") from err


def load_model(path: Path, build: Callable[[ModelConfig], nn.Module] = LanguageModel
               ) -> tuple[nn.Module, Checkpoint]:
    """Rebuild a model from a checkpoint; a weight/shape mismatch raises ``ValueError``."""
    saved = load_checkpoint(path)
    model = build(saved.config)
    try:
        model.load_state_dict(saved.model_state)
    except RuntimeError as err:
        raise ValueError(f"checkpoint {path} does not match the model being built: {err}") from err
    model.eval()
    return model, saved
