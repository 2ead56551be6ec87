"""Training, evaluation and checkpoints.

Training is AdamW with linear warm-up and cosine decay, gradient-norm clipping, seeded batches
and a resumable checkpoint. A checkpoint holds the model config, the vocabulary, the weights,
the optimiser and the step; it is written atomically and read with ``weights_only=True``, and
every field is checked on reading (a damaged file is a one-line error naming it). Training that
ends with non-finite weights raises ``TrainingDiverged`` instead of writing a checkpoint.

Every step draws its batch, and any sampling inside the model, from seeds of its own
(``step_seed``), so a training resumed from a checkpoint written at step ``k`` takes exactly the
steps ``k, k+1, ...`` an uninterrupted one takes and ends with the same weights. With
``checkpoint_every``, a long training saves its state every that many steps beside its
checkpoint (``partial_checkpoint``), so a killed run resumes from the last one.
"""

from __future__ import annotations

import hashlib
import math
import pickle
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from bk.atomic import write_file
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
    distill: float = 0.0  # weight of the distillation term (needs a teacher; 0: none)
    threads: int = 1  # torch threads while training (sums in another order: other weights)

    def __post_init__(self) -> None:
        if (self.steps < 0 or self.batch_size < 1 or self.lr <= 0 or self.grad_clip <= 0
                or self.threads < 1):
            raise ValueError(f"invalid TrainConfig: {self}; expected steps >= 0, batch_size >= 1, "
                             "lr > 0, grad_clip > 0 and threads >= 1")
        if not (self.distill >= 0 and math.isfinite(self.distill)):
            raise ValueError(f"TrainConfig.distill must be a finite number >= 0, got "
                             f"{self.distill!r}")


def distillation(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Mean over positions of KL(teacher || student) of the next-token distributions, nats
    (Hinton et al. 2015 at temperature 1): the student's cross-entropy against the teacher's
    distribution minus the teacher's entropy, so it is 0 exactly when the two agree."""
    teacher = F.log_softmax(teacher_logits.detach().float(), dim=-1)
    student = F.log_softmax(student_logits.float(), dim=-1)
    kl = (teacher.exp() * (teacher - student)).sum(dim=-1)
    return kl.mean()


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
             seq_len: int | None = None, max_batches: int | None = None,
             after_batch: Callable[[], None] | None = None) -> Evaluation:
    """Mean next-token cross-entropy over every target of ``split`` (or its first batches);
    ``after_batch`` runs after each batch (progress reporting)."""
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
        if after_batch is not None:
            after_batch()
    model.train(was_training)
    if count == 0:
        raise ValueError(f"split {split!r} of corpus {corpus.name!r} has no tokens to evaluate")
    return Evaluation(split, total / count, count)


def learning_rate(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def evaluation_batches(corpus: Corpus, split: str = "test", *, batch_size: int = 32,
                       seq_len: int, max_batches: int | None = None) -> int:
    """How many batches ``evaluate`` runs with these settings."""
    count = sum(1 for _ in corpus.batches(split, batch_size, seq_len, drop_last=False))
    return count if max_batches is None else min(count, max_batches)


def step_seed(cfg: TrainConfig, step: int) -> int:
    """The seed of training step ``step``: its batch and any sampling inside the model."""
    return cfg.seed * 1_000_003 + step


def partial_checkpoint(checkpoint: Path) -> Path:
    """Where a training that ends in ``checkpoint`` keeps its periodic state."""
    return checkpoint.with_name(checkpoint.name + ".partial")


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Torch's intra-op threads set to ``n`` inside the block, restored after."""
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def train(model: nn.Module, corpus: Corpus, cfg: TrainConfig, *,
          checkpoint: Path | None = None, resume: bool = False, progress: bool = True,
          desc: str = "train", meta: dict[str, Any] | None = None,
          on_step: Callable[[int, nn.Module], None] | None = None,
          after_step: Callable[[int], None] | None = None,
          checkpoint_every: int = 0, teacher: nn.Module | None = None) -> TrainResult:
    """Train ``model`` on ``corpus`` for ``cfg.steps`` steps; the objective is ``model(x, y).loss``
    plus, with ``cfg.distill > 0``, ``cfg.distill`` times the :func:`distillation` of the frozen
    ``teacher``'s logits on the same batch.

    ``on_step(step, model)`` runs before each step (for schedules), ``after_step(done)`` after
    each one with the number of steps done. With ``checkpoint_every`` (> 0) and a
    ``checkpoint``, the state is saved every that many steps to ``partial_checkpoint
    (checkpoint)``, which is removed once ``checkpoint`` is written. With ``resume``, training
    continues, with the saved optimiser state, from ``checkpoint`` if it exists, else from the
    partial checkpoint when it was written for the same ``meta``.
    """
    if cfg.distill > 0 and teacher is None:
        raise ValueError(f"TrainConfig.distill = {cfg.distill} needs a teacher model")
    if teacher is not None:
        teacher.eval()
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    partial = None if checkpoint is None else partial_checkpoint(Path(checkpoint))
    start = 0
    saved = _resume_point(checkpoint, partial, meta) if resume else None
    if saved is not None:
        load_weights(model, saved.model_state, f"checkpoint {checkpoint}")
        if saved.optimizer_state is not None:
            optimizer.load_state_dict(saved.optimizer_state)
        start = saved.step
    model.train()
    result = TrainResult(steps=start, seconds=0.0)
    began = time.perf_counter()
    bar = tqdm(range(start, cfg.steps), desc=desc, disable=not progress, leave=False)
    with torch_threads(cfg.threads):
        for step in bar:
            # Batches come from the step's generator; the global generator drives any sampling
            # inside the model (Gumbel noise), so seeding it too makes every step repeat exactly.
            generator = torch.Generator().manual_seed(step_seed(cfg, step))
            torch.manual_seed(step_seed(cfg, step))
            if on_step is not None:
                on_step(step, model)
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(step, cfg)
            x, y = corpus.random_batch("train", cfg.batch_size, model.cfg.n_seq, generator)
            out = model(x, y)
            loss = out.loss
            if cfg.distill > 0:
                with torch.no_grad():
                    teacher_logits = teacher(x).logits
                loss = loss + cfg.distill * distillation(out.logits, teacher_logits)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
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
            if (partial is not None and checkpoint_every and (step + 1) % checkpoint_every == 0
                    and step + 1 < cfg.steps):
                _check_finite(model, desc, result.steps, cfg)
                save_checkpoint(partial, model, corpus.vocab, step=result.steps,
                                optimizer=optimizer, meta=meta)
            if after_step is not None:
                after_step(result.steps)
    result.seconds = time.perf_counter() - began
    model.eval()
    _check_finite(model, desc, result.steps, cfg)
    if checkpoint is not None:
        save_checkpoint(checkpoint, model, corpus.vocab, step=result.steps,
                        optimizer=optimizer, meta=meta)
        partial.unlink(missing_ok=True)
    return result


def _check_finite(model: nn.Module, desc: str, steps: int, cfg: TrainConfig) -> None:
    bad = non_finite(model.state_dict())
    if bad:
        raise TrainingDiverged(f"{desc} diverged: NaN or infinite weights in {bad[:5]} after "
                               f"{steps} steps (lr {cfg.lr}); no checkpoint written")


def _resume_point(checkpoint: Path | None, partial: Path | None,
                  meta: dict[str, Any] | None) -> Checkpoint | None:
    """The checkpoint to continue from: ``checkpoint`` itself, else the partial one if it was
    written for the same ``meta`` (a damaged or foreign partial checkpoint is not used)."""
    if checkpoint is not None and Path(checkpoint).exists():
        return load_checkpoint(checkpoint)
    if partial is None or not partial.exists():
        return None
    try:
        saved = load_checkpoint(partial)
    except ValueError as err:
        warnings.warn(f"not resuming from {partial}: {err}", stacklevel=3)
        return None
    return saved if saved.meta == (meta or {}) else None


@dataclass
class Checkpoint:
    config: ModelConfig
    vocab: Vocabulary
    model_state: dict[str, torch.Tensor]
    optimizer_state: dict[str, Any] | None
    step: int
    meta: dict[str, Any]


FORMAT = "bk-checkpoint-1"
_ZIP_MAGIC = b"PK\x03\x04"  # torch.save writes a zip archive


class TrainingDiverged(ValueError):
    """Training ended with non-finite weights; no checkpoint was written."""


def non_finite(state: dict[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors of a state dict holding NaN or infinity."""
    return [name for name, tensor in state.items()
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())]


def content_digest(value: Any) -> str:
    """SHA-256 of nested dicts, lists, tensors and plain values (dict keys sorted). A checkpoint
    stores the digest of its content, so damaged bytes that torch does not detect (weights,
    vocabulary, settings) are caught on reading."""
    digest = hashlib.sha256()

    def feed(item: Any) -> None:
        if isinstance(item, torch.Tensor):
            tensor = item.detach().cpu().contiguous()
            digest.update(f"T{tensor.dtype}{tuple(tensor.shape)}".encode())
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(item, dict):
            digest.update(f"D{len(item)}".encode())
            for key in sorted(item, key=repr):
                feed(key)
                feed(item[key])
        elif isinstance(item, list | tuple):
            digest.update(f"L{len(item)}".encode())
            for element in item:
                feed(element)
        else:
            digest.update(f"V{item!r};".encode())

    feed(value)
    return digest.hexdigest()


def save_checkpoint(path: Path, model: nn.Module, vocab: Vocabulary, *, step: int,
                    optimizer: torch.optim.Optimizer | None = None,
                    meta: dict[str, Any] | None = None) -> None:
    """Write a checkpoint atomically (``bk.atomic``: a temporary renamed over the target)."""
    payload = {
        "format": FORMAT,
        "config": asdict(model.cfg),
        "vocab": {"tokens": list(vocab.tokens), "level": vocab.level},
        "model_state": model.state_dict(),
        "optimizer_state": optimizer.state_dict() if optimizer is not None else None,
        "step": step,
        "meta": meta or {},
    }
    payload["sha256"] = content_digest(payload)
    write_file(Path(path), lambda handle: torch.save(payload, handle))


def _first_line(text: object) -> str:
    """The first sentence of a (possibly multi-line) message."""
    line = next((part.strip() for part in str(text).splitlines() if part.strip()), "")
    return line.split(". ")[0].rstrip(".")[:200]


def _read_payload(path: Path) -> Any:
    with path.open("rb") as handle:
        head = handle.read(4)
    if not head:
        raise ValueError(f"checkpoint {path} is empty (0 bytes)")
    if head != _ZIP_MAGIC:
        raise ValueError(f"checkpoint {path} is not a torch checkpoint (no zip archive header): "
                         "corrupt, or another kind of file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        detail = str(err).partition("WeightsUnpickler error:")[2] or str(err)
        raise ValueError(f"checkpoint {path} is corrupt or holds objects other than tensors and "
                         f"plain values (torch.load(weights_only=True) refused it: "
                         f"{_first_line(detail)})") from None
    except Exception as err:  # torch raises several types for truncated or damaged archives
        raise ValueError(f"checkpoint {path} is corrupt or truncated "
                         f"({type(err).__name__}: {_first_line(err)})") from None


def _field(payload: dict[str, Any], name: str, kind: type | tuple[type, ...], path: Path) -> Any:
    if name not in payload:
        raise ValueError(f"checkpoint {path} lacks the field {name!r}")
    value = payload[name]
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
        raise ValueError(f"checkpoint {path}: field {name!r} is a {type(value).__name__}, "
                         f"expected {getattr(kind, '__name__', kind)}")
    return value


def load_checkpoint(path: Path) -> Checkpoint:
    """Read and check a checkpoint. A missing file raises ``FileNotFoundError``; a corrupt,
    foreign or malformed one a one-line ``ValueError`` naming the file and what is wrong
    (including NaN or infinite weights)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    payload = _read_payload(path)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"checkpoint {path} is not a bk checkpoint (expected format {FORMAT!r})")
    recorded = payload.pop("sha256", None)  # absent in checkpoints of older versions
    if recorded is not None and recorded != content_digest(payload):
        raise ValueError(f"checkpoint {path} is corrupt: its content does not match the hash "
                         "written with it")
    config = _field(payload, "config", dict, path)
    try:
        config = ModelConfig(**config)
    except (TypeError, ValueError) as err:
        raise ValueError(f"checkpoint {path}: field 'config' is invalid: {err}") from None
    vocab = _field(payload, "vocab", dict, path)
    try:
        vocab = Vocabulary(tuple(vocab["tokens"]), vocab["level"])
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"checkpoint {path}: field 'vocab' is invalid: {err!s}") from None
    state = _field(payload, "model_state", dict, path)
    if not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise ValueError(f"checkpoint {path}: field 'model_state' must map names to tensors")
    bad = non_finite(state)
    if bad:
        raise ValueError(f"checkpoint {path} holds NaN or infinite weights in {bad[:5]}")
    optimizer_state = payload.get("optimizer_state")
    if optimizer_state is not None and not isinstance(optimizer_state, dict):
        raise ValueError(f"checkpoint {path}: field 'optimizer_state' must be a dict or None")
    step = _field(payload, "step", int, path)
    if step < 0:
        raise ValueError(f"checkpoint {path}: field 'step' is {step}, expected >= 0")
    meta = _field(payload, "meta", dict, path)
    return Checkpoint(config, vocab, state, optimizer_state, step, meta)


def load_model(path: Path, build: Callable[[ModelConfig], nn.Module] = LanguageModel
               ) -> tuple[nn.Module, Checkpoint]:
    """Rebuild a model from a checkpoint; a weight/shape mismatch raises ``ValueError``."""
    saved = load_checkpoint(path)
    model = build(saved.config)
    load_weights(model, saved.model_state, f"checkpoint {path}")
    model.eval()
    return model, saved


def load_weights(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """``model.load_state_dict(state)``, with any mismatch named on one line."""
    expected = model.state_dict()
    missing = sorted(expected.keys() - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    shapes = [f"{k} {tuple(state[k].shape)} (model {tuple(v.shape)})"
              for k, v in expected.items() if k in state and state[k].shape != v.shape]
    if missing or unexpected or shapes:
        problems = [f"{label} {names[:5]}" for label, names in
                    (("missing weights", missing), ("unexpected weights", unexpected),
                     ("shapes differ:", shapes)) if names]
        raise ValueError(f"{source} does not match the model being built "
                         f"({type(model).__name__}): {'; '.join(problems)}")
    model.load_state_dict(state)
