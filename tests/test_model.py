"""Properties of the dense ResNet-BK model, its training and its checkpoints."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from bk.data import Corpus, Vocabulary
from bk.model import LanguageModel, ModelConfig
from bk.moe import MoEFeedForward
from bk.train import TrainConfig, evaluate, load_checkpoint, load_model, save_checkpoint, train
from tests.strategies import TINY, decode, float64_model, random_tokens, seeds, tiny_model


@given(length=st.integers(2, 16), cut=st.integers(1, 15), seed=seeds)
def test_logits_at_a_position_depend_only_on_tokens_up_to_it(length, cut, seed):
    cut = min(cut, length - 1)
    model = tiny_model(0)
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, TINY.vocab_size, (2, length), generator=g)
    y = x.clone()
    y[:, cut:] = torch.randint(0, TINY.vocab_size, (2, length - cut), generator=g)
    with torch.no_grad():
        a, b = model(x).logits, model(y).logits
    # Not bit-identical: expert matmuls see different row counts when routing changes, and BLAS
    # blocking depends on the row count. A leak would move logits by ~0.1, not ~1e-16.
    torch.testing.assert_close(a[:, :cut], b[:, :cut], rtol=0, atol=1e-12)


@given(length=st.integers(1, 12), seed=seeds)
def test_step_by_step_decoding_equals_the_full_forward_pass(length, seed):
    model = tiny_model(seed % 7)
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, TINY.vocab_size, (3, length), generator=g)
    with torch.no_grad():
        full = model(x).logits
    torch.testing.assert_close(decode(model, x)[0], full, rtol=1e-10, atol=1e-10)


def test_a_sequence_result_does_not_depend_on_the_rest_of_its_batch():
    model = tiny_model(0)
    x = random_tokens(3, 4, 16)
    with torch.no_grad():
        together = model(x).logits
        alone = torch.cat([model(x[i:i + 1]).logits for i in range(4)])
    torch.testing.assert_close(together, alone, rtol=1e-12, atol=1e-12)


def test_work_counts_every_token_layer_of_the_dense_model():
    out = tiny_model(0)(torch.zeros(2, 5, dtype=torch.long))
    layers = TINY.n_layers
    assert (out.work.token_layers, out.work.expert_calls, out.work.positions) == (10 * layers,) * 3
    assert torch.equal(out.stats["layers_per_token"], torch.full((2, 5), float(layers),
                                                                 dtype=torch.float64))


def test_the_router_and_every_block_parameter_receive_gradient():
    model = float64_model(0).train()
    x = random_tokens(0, 4, 16)
    model(x, x).loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@given(training=st.booleans(), seed=seeds, dtype=st.sampled_from(
    [torch.float32, torch.float64]))
def test_the_fused_block_forward_equals_token_work_readout_and_residual(training, seed, dtype):
    """BKBlock.forward (expert outputs, residual and readout summed in one pass) computes
    x + f + mix(G) from token_work bit for bit (techniques compose the block that way and must
    reproduce the dense model exactly), with the same gradients."""
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=5, d_model=8, n_layers=1, n_seq=6, n_experts=3, d_expert=12,
                      bk_channels=3)
    block = LanguageModel(cfg).blocks[0].to(dtype).train(training)
    x = torch.randn(2, 6, 8, dtype=dtype, requires_grad=True)
    out, balance = block(x)
    weights = torch.randn_like(out)
    ((out * weights).sum() + balance).backward()
    grads = [x.grad] + [p.grad for p in block.parameters()]
    x.grad = None
    block.zero_grad()
    f, v, reference_balance = block.token_work(x.reshape(12, 8))
    g = block.resolvent(v.reshape(2, 6, -1))
    expected = x + f.view(2, 6, 8) + block.mix(g)
    ((expected * weights).sum() + reference_balance).backward()
    assert torch.equal(out, expected)
    assert torch.equal(balance, reference_balance)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else {}
    for got, want in zip(grads, [x.grad] + [p.grad for p in block.parameters()], strict=True):
        torch.testing.assert_close(got, want, **tol)


def test_moe_dispatch_equals_the_dense_gated_computation():
    torch.manual_seed(0)
    moe = MoEFeedForward(8, 12, 3).double()
    x = torch.randn(50, 8, dtype=torch.float64)
    routing = moe.route(x)
    dense = torch.stack([e(x) for e in moe.experts], 1)  # (T, E, d)
    expected = dense[torch.arange(50), routing.expert] * routing.gate[:, None]
    torch.testing.assert_close(moe.dispatch(x, routing), expected)


def test_balance_loss_is_one_for_a_perfectly_balanced_uniform_router():
    moe = MoEFeedForward(4, 4, 2)
    from bk.moe import Routing

    routing = Routing(expert=torch.tensor([0, 1, 0, 1]), gate=torch.full((4,), 0.5),
                      probs=torch.full((4, 2), 0.5))
    assert float(moe.balance_loss(routing)) == pytest.approx(1.0)


@pytest.mark.parametrize("bad, error", [
    (torch.zeros(2, 3), TypeError),
    (torch.zeros(3, dtype=torch.long), ValueError),
    (torch.full((1, 3), 17), ValueError),
    (torch.full((1, 3), -1), ValueError),
])
def test_bad_token_ids_raise_a_clear_error(bad, error):
    with pytest.raises(error, match="token ids"):
        tiny_model(0)(bad)


def test_a_bad_config_raises_a_clear_error():
    with pytest.raises(ValueError, match="n_layers"):
        ModelConfig(n_layers=0)


def uniform_corpus(n: int = 40_000, vocab: int = 17) -> Corpus:
    g = torch.Generator().manual_seed(0)
    voc = Vocabulary(tuple(chr(ord("a") + i) for i in range(vocab)), "char")
    return Corpus("uniform", voc, *(torch.randint(0, vocab, (m,), generator=g)
                                    for m in (n, n // 4, n // 4)))


def test_no_future_leak_held_out_loss_on_uniform_tokens_stays_at_log_v():
    # A model that could see the next token would drive this loss far below log(V).
    corpus = uniform_corpus()
    torch.manual_seed(0)
    model = LanguageModel(TINY)
    train(model, corpus, TrainConfig(steps=150, batch_size=16, lr=1e-2, warmup=10),
          progress=False)
    loss = evaluate(model, corpus, "test", batch_size=16).loss
    assert loss > math.log(TINY.vocab_size) - 0.02


def test_checkpoint_round_trip_restores_weights_and_resume_continues(tmp_path):
    corpus = uniform_corpus(5000)
    torch.manual_seed(0)
    model = LanguageModel(TINY)
    path = tmp_path / "m.pt"
    train(model, corpus, TrainConfig(steps=3, batch_size=4, warmup=1), checkpoint=path,
          progress=False)
    loaded, saved = load_model(path)
    assert saved.step == 3 and saved.vocab == corpus.vocab
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    resumed = LanguageModel(TINY)
    result = train(resumed, corpus, TrainConfig(steps=5, batch_size=4, warmup=1),
                   checkpoint=path, resume=True, progress=False)
    assert result.steps == 5 and load_checkpoint(path).step == 5


def test_a_corrupt_or_mismatched_checkpoint_raises_a_clear_error(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="corrupt"):
        load_checkpoint(bad)
    good = tmp_path / "good.pt"
    save_checkpoint(good, float64_model(0).float(), uniform_corpus(100).vocab, step=0)
    with pytest.raises(ValueError, match="does not match"):
        load_model(good, lambda cfg: LanguageModel(ModelConfig(vocab_size=5)))
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "missing.pt")
