"""Training with distillation from a frozen teacher (bk/train.py)."""

import copy

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from bk.data import load_corpus
from bk.model import LanguageModel, ModelConfig
from bk.train import TrainConfig, distillation, train

F64 = torch.float64


@given(st.integers(0, 2**16), st.integers(1, 3), st.integers(1, 5), st.integers(2, 7))
def test_distillation_is_the_kl_divergence_from_the_teacher_with_its_exact_gradient(
        seed, b, n, v):
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(b, n, v, generator=g, dtype=F64, requires_grad=True)
    teacher = torch.randn(b, n, v, generator=g, dtype=F64)
    p, q = torch.softmax(teacher, -1), torch.softmax(student, -1)
    expected = (p * (p.log() - q.log())).sum(-1).mean()
    got = distillation(student, teacher)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)
    (grad,) = torch.autograd.grad(got, student)
    torch.testing.assert_close(grad, (q - p).detach() / (b * n), rtol=1e-4, atol=1e-6)
    assert float(distillation(teacher, teacher)) == pytest.approx(0.0, abs=1e-6)


def test_distilling_pulls_the_student_towards_the_teacher_and_needs_one():
    corpus = load_corpus("synthetic")
    cfg = ModelConfig(vocab_size=len(corpus.vocab), d_model=16, n_layers=2, n_seq=16,
                      n_experts=2, d_expert=16, bk_channels=2)
    torch.manual_seed(0)
    teacher = LanguageModel(cfg).eval()
    x, _ = corpus.random_batch("valid", 8, cfg.n_seq, torch.Generator().manual_seed(1))
    gaps = {}
    for weight in (0.0, 20.0):
        torch.manual_seed(1)
        student = LanguageModel(cfg)
        train(student, corpus, TrainConfig(steps=30, batch_size=8, warmup=1, distill=weight),
              progress=False, teacher=copy.deepcopy(teacher))
        with torch.no_grad():
            gaps[weight] = float(distillation(student(x).logits, teacher(x).logits))
    assert gaps[20.0] < 0.6 * gaps[0.0]
    with pytest.raises(ValueError, match="needs a teacher"):
        train(LanguageModel(cfg), corpus, TrainConfig(steps=1, distill=1.0), progress=False)
    with pytest.raises(ValueError, match="distill"):
        TrainConfig(distill=float("nan"))
