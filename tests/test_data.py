"""Tests for bk.data: vocabularies, corpora (shakespeare / synthetic / text:PATH) and batching."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import bk.data as data
from bk.data import SPLITS, UNK, Corpus, Vocabulary, load_corpus, shakespeare_plays

HYPOTHESIS = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])

TEXT_SAMPLE = (
    "the quick brown fox jumps over the lazy dog\n"
    "pack my box with five dozen liquor jugs\n"
    "how vexingly quick daft zebras jump\n"
) * 40


# ------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def shakespeare() -> Corpus:
    return load_corpus("shakespeare")


@pytest.fixture(scope="module")
def synthetic() -> Corpus:
    return load_corpus("synthetic")


@pytest.fixture(scope="module")
def text_corpus(tmp_path_factory: pytest.TempPathFactory) -> Corpus:
    path = tmp_path_factory.mktemp("text") / "sample.txt"
    path.write_text(TEXT_SAMPLE, encoding="utf-8")
    return load_corpus(f"text:{path}")


@pytest.fixture(scope="module")
def word_corpus(tmp_path_factory: pytest.TempPathFactory) -> Corpus:
    path = tmp_path_factory.mktemp("words") / "sample.txt"
    path.write_text(TEXT_SAMPLE, encoding="utf-8")
    return load_corpus(f"text:{path}", level="word")


@pytest.fixture(scope="module")
def corpora(shakespeare, synthetic, text_corpus, word_corpus) -> dict[str, Corpus]:
    return {
        "shakespeare": shakespeare,
        "synthetic": synthetic,
        "text": text_corpus,
        "word": word_corpus,
    }


SOURCES = st.sampled_from(["shakespeare", "synthetic", "text", "word"])


def occurs_in(stream: torch.Tensor, window: torch.Tensor) -> bool:
    """Whether ``window`` is a contiguous piece of ``stream``."""
    haystack = stream.numpy().astype("<i4").tobytes()
    needle = window.numpy().astype("<i4").tobytes()
    pos = haystack.find(needle)
    while pos != -1 and pos % 4:
        pos = haystack.find(needle, pos + 1)
    return pos != -1


# ---------------------------------------------------------------------------- batch alignment


@HYPOTHESIS
@given(
    source=SOURCES,
    split=st.sampled_from(SPLITS),
    batch_size=st.integers(1, 9),
    seq_len=st.integers(1, 40),
)
def test_targets_are_inputs_shifted_by_one(corpora, source, split, batch_size, seq_len):
    corpus = corpora[source]
    stream = corpus.split(split)
    for i, (inputs, targets) in enumerate(corpus.batches(split, batch_size, seq_len)):
        assert inputs.shape == targets.shape == (batch_size, seq_len)
        assert inputs.dtype == targets.dtype == torch.int64
        for b in range(batch_size):
            start = (i * batch_size + b) * seq_len
            assert torch.equal(inputs[b], stream[start : start + seq_len])
            assert torch.equal(targets[b], stream[start + 1 : start + seq_len + 1])
        if i >= 3:
            break


@HYPOTHESIS
@given(
    source=SOURCES,
    split=st.sampled_from(SPLITS),
    batch_size=st.integers(1, 9),
    seq_len=st.integers(1, 40),
    seed=st.integers(0, 2**31),
)
def test_random_and_shuffled_windows_are_contiguous_pieces_of_the_split(
    corpora, source, split, batch_size, seq_len, seed
):
    corpus = corpora[source]
    stream = corpus.split(split)
    gen = torch.Generator().manual_seed(seed)
    inputs, targets = corpus.random_batch(split, batch_size, seq_len, gen)
    shuffled = next(corpus.batches(split, batch_size, seq_len, shuffle=True, generator=gen), None)
    pairs = [(inputs, targets)] + ([shuffled] if shuffled is not None else [])
    for x, y in pairs:
        assert x.shape == y.shape == (batch_size, seq_len)
        assert torch.equal(x[:, 1:], y[:, :-1])
        for b in range(batch_size):
            assert occurs_in(stream, torch.cat([x[b], y[b, -1:]]))


def test_random_batch_is_reproducible_with_a_seeded_generator(synthetic):
    a = synthetic.random_batch("train", 4, 16, torch.Generator().manual_seed(3))
    b = synthetic.random_batch("train", 4, 16, torch.Generator().manual_seed(3))
    assert all(torch.equal(u, v) for u, v in zip(a, b, strict=True))


@HYPOTHESIS
@given(
    source=st.sampled_from(["synthetic", "text", "word"]),
    split=st.sampled_from(SPLITS),
    batch_size=st.integers(1, 50),
    seq_len=st.integers(1, 300),
)
def test_eval_batches_score_every_target_exactly_once(corpora, source, split, batch_size, seq_len):
    corpus = corpora[source]
    stream = corpus.split(split)
    batches = list(corpus.batches(split, batch_size, seq_len, drop_last=False))
    targets = torch.cat([y.reshape(-1) for _, y in batches])
    assert torch.equal(targets, stream[1:])
    assert sum(x.shape[0] for x, _ in batches) == corpus.n_windows(split, seq_len)
    for x, y in batches:
        assert x.shape == y.shape and x.shape[0] <= batch_size and x.shape[1] <= seq_len
        assert x.shape[1] == seq_len or x.shape[0] == 1  # only the final partial window is short


def test_eval_batches_cover_the_whole_shakespeare_test_split(shakespeare):
    stream = shakespeare.test
    targets = torch.cat(
        [y.reshape(-1) for _, y in shakespeare.batches("test", 64, 256, drop_last=False)]
    )
    assert torch.equal(targets, stream[1:])


def test_shuffled_eval_batches_score_every_target_exactly_once(synthetic):
    gen = torch.Generator().manual_seed(0)
    seq_len = 100
    seen = []
    for x, y in synthetic.batches(
        "valid", 32, seq_len, shuffle=True, generator=gen, drop_last=False
    ):
        seen.append(torch.cat([x[:, :1], y], dim=1))
    # Each full window is stream[kL : kL+L+1]; recover k from rows and check a permutation.
    stream = synthetic.valid
    full = stream[: (stream.numel() - 1) // seq_len * seq_len + 1]
    windows = full.unfold(0, seq_len + 1, seq_len)
    rows = torch.cat([w for w in seen if w.shape[1] == seq_len + 1])
    assert rows.shape[0] == windows.shape[0]
    assert sorted(map(tuple, rows.tolist())) == sorted(map(tuple, windows.tolist()))


def test_drop_last_yields_only_full_batches(synthetic):
    batches = list(synthetic.batches("valid", 7, 33))
    assert all(x.shape == (7, 33) for x, _ in batches)
    assert len(batches) == (synthetic.valid.numel() - 1) // 33 // 7


def test_bad_batch_arguments_raise_clearly(synthetic):
    with pytest.raises(ValueError, match="batch_size"):
        next(synthetic.batches("train", 0, 8))
    with pytest.raises(ValueError, match="seq_len"):
        synthetic.random_batch("train", 2, -1)
    with pytest.raises(ValueError, match="split"):
        synthetic.n_windows("dev", 8)
    with pytest.raises(ValueError, match="fewer than seq_len"):
        synthetic.random_batch("test", 1, 10**7)


# --------------------------------------------------------------------------------- vocabulary


def test_char_vocabulary_round_trips_and_names_unknown_characters():
    vocab = Vocabulary(tuple("abc \n"), "char")
    ids = vocab.encode("cab a\n")
    assert ids.dtype == torch.int64 and ids.tolist() == [2, 0, 1, 3, 0, 4]
    assert vocab.decode(ids) == "cab a\n"
    assert vocab.encode(["a", "b"]).tolist() == [0, 1]
    assert len(vocab) == 5
    with pytest.raises(ValueError, match="'z'"):
        vocab.encode("abz")


def test_word_vocabulary_maps_unknown_words_to_unk():
    vocab = Vocabulary(("the", "cat", UNK), "word")
    assert vocab.encode("the dog  cat").tolist() == [0, 2, 1]
    assert vocab.encode(["cat", "the"]).tolist() == [1, 0]
    assert vocab.decode([0, 1, 2]) == f"the cat {UNK}"
    with pytest.raises(ValueError, match=re.escape(UNK)):
        Vocabulary(("the", "cat"), "word")


def test_vocabulary_rejects_duplicates_and_bad_levels():
    with pytest.raises(ValueError, match="duplicate"):
        Vocabulary(("a", "a"), "char")
    with pytest.raises(ValueError, match="level"):
        Vocabulary(("a",), "byte")


# -------------------------------------------------------------------------------- shakespeare


def test_shakespeare_splits_are_disjoint_by_play():
    plays = shakespeare_plays()
    assert len(plays) == 38
    by_split = {s: {pid for pid, split, _ in plays if split == s} for s in SPLITS}
    assert all(by_split.values())
    assert sum(len(v) for v in by_split.values()) == len({pid for pid, _, _ in plays})
    for a in SPLITS:
        for b in SPLITS:
            assert a == b or not by_split[a] & by_split[b]
    # the docstring lists the valid and test plays
    for s in ("valid", "test"):
        for pid in by_split[s]:
            assert pid in data.__doc__


def test_shakespeare_split_streams_are_their_plays_concatenated(shakespeare):
    for s in ("valid", "test"):
        expected = "\n".join(text for _, split, text in shakespeare_plays() if split == s)
        assert shakespeare.vocab.decode(shakespeare.split(s)) == expected


def test_shakespeare_is_deterministic_across_calls(shakespeare):
    data._cached_load.cache_clear()
    data.shakespeare_plays.cache_clear()
    again = load_corpus("shakespeare")
    assert again is not shakespeare
    assert again.vocab == shakespeare.vocab
    for s in SPLITS:
        assert torch.equal(again.split(s), shakespeare.split(s))
    assert load_corpus() is again  # cached


def test_shakespeare_has_no_markup_left():
    for pid, _, text in shakespeare_plays():
        assert "**" not in text, pid
        assert "*" not in text and "_" not in text, pid
        assert not re.search(r"^#", text, re.MULTILINE), pid
        assert "\\" not in text and "&amp;" not in text, pid
        assert not re.search(r"[ \t]+$", text, re.MULTILINE), pid
        assert "\n\n\n" not in text, pid


def test_shakespeare_keeps_speakers_and_stage_directions_as_plain_text():
    plays = {pid: text for pid, _, text in shakespeare_plays()}
    macbeth = plays["tragedies/macbeth"]
    assert macbeth.startswith("Macbeth\n\nACT I\n")
    assert "\nFirst Witch\nWhen shall we three meet again\n" in macbeth
    assert "\nThunder and lightning. Enter three Witches\n" in macbeth
    assert "[Within]" in plays["tragedies/othello"]


def test_shakespeare_sizes_and_vocabulary_are_sane(shakespeare):
    assert shakespeare.train.numel() > 3_000_000
    assert 300_000 < shakespeare.valid.numel() < 700_000
    assert 300_000 < shakespeare.test.numel() < 700_000
    assert 60 <= len(shakespeare.vocab) <= 100
    assert shakespeare.vocab.level == "char"
    assert shakespeare.entropy_rate is None
    for s in SPLITS:
        stream = shakespeare.split(s)
        assert stream.dtype == torch.int64 and stream.dim() == 1
        assert 0 <= int(stream.min()) and int(stream.max()) < len(shakespeare.vocab)


@HYPOTHESIS
@given(start=st.integers(0, 450_000), length=st.integers(0, 2_000))
def test_shakespeare_vocabulary_round_trips(shakespeare, start, length):
    text = shakespeare.vocab.decode(shakespeare.valid[start : start + length])
    assert shakespeare.vocab.decode(shakespeare.vocab.encode(text)) == text
    assert torch.equal(shakespeare.vocab.encode(text), shakespeare.valid[start : start + length])


# ---------------------------------------------------------------------------------- synthetic


def test_synthetic_entropy_rate_matches_the_empirical_cross_entropy(synthetic):
    source = data.synthetic_source()
    assert synthetic.entropy_rate == pytest.approx(source.entropy_rate)
    for split, max_stderr in (("test", 0.05), ("train", 0.015)):
        stream = synthetic.split(split)
        loss = source.token_log_loss(stream).double()
        # Markov-chain standard error by batch means (blocks much longer than a regime stretch).
        blocks = loss[: loss.numel() // 2000 * 2000].reshape(-1, 2000).mean(dim=1)
        stderr = float(blocks.std()) / math.sqrt(blocks.numel())
        assert stderr < max_stderr
        assert abs(float(loss.mean()) - synthetic.entropy_rate) < 4 * stderr, split


def test_synthetic_losses_match_their_conditional_entropies_tightly(synthetic):
    # E[-log P(x_t+1 | x_t) | x_t] = H(P[x_t]): the differences are martingale increments, so
    # their mean has an iid-like standard error, free of the slow regime-occupancy noise.
    source = data.synthetic_source()
    p = torch.from_numpy(source.transition)
    row_entropy = -(p * p.log()).sum(dim=1)
    stream = synthetic.test
    diff = source.token_log_loss(stream).double() - row_entropy[stream[:-1]]
    stderr = float(diff.std()) / math.sqrt(diff.numel())
    assert stderr < 0.01
    assert abs(float(diff.mean())) < 4 * stderr


def test_synthetic_source_is_a_valid_markov_chain():
    source = data.synthetic_source()
    p, pi = source.transition, source.stationary
    assert np.allclose(p.sum(axis=1), 1.0)
    assert np.allclose(pi @ p, pi) and pi.sum() == pytest.approx(1.0)
    h = -(pi[:, None] * p * np.log(p)).sum()
    assert source.entropy_rate == pytest.approx(h)
    assert 0 < source.entropy_rate < math.log(64)


def test_synthetic_is_deterministic_by_seed():
    a = load_corpus("synthetic", seed=5, train_tokens=5000, valid_tokens=500, test_tokens=500)
    data._cached_load.cache_clear()
    b = load_corpus("synthetic", seed=5, train_tokens=5000, valid_tokens=500, test_tokens=500)
    c = load_corpus("synthetic", seed=6, train_tokens=5000, valid_tokens=500, test_tokens=500)
    assert a is not b
    assert all(torch.equal(a.split(s), b.split(s)) for s in SPLITS)
    assert a.entropy_rate == b.entropy_rate
    assert not torch.equal(a.train, c.train)


def test_synthetic_has_easy_and_hard_stretches(synthetic):
    source = data.synthetic_source()
    stream = synthetic.test
    hard = source.is_hard(stream)
    loss = source.token_log_loss(stream)
    target_hard = hard[1:]
    easy_loss, hard_loss = loss[~target_hard & ~hard[:-1]], loss[target_hard & hard[:-1]]
    assert float(easy_loss.mean()) < 0.6 < 2.5 < float(hard_loss.mean())
    # runs of each regime: many, and long enough to adapt to
    change = torch.nonzero(hard[1:] != hard[:-1]).flatten()
    runs = torch.diff(change)
    assert runs.numel() > 200
    assert float(runs.double().mean()) > 20
    assert 0.3 < float(hard.double().mean()) < 0.7


def test_synthetic_defaults_and_options(synthetic):
    assert len(synthetic.vocab) == 64
    assert (synthetic.train.numel(), synthetic.valid.numel(), synthetic.test.numel()) == (
        600_000,
        60_000,
        60_000,
    )
    small = load_corpus(
        "synthetic", vocab_size=10, train_tokens=100, valid_tokens=20, test_tokens=20
    )
    assert len(small.vocab) == 10 and int(small.train.max()) < 10
    with pytest.raises(ValueError, match="vocab_size"):
        load_corpus("synthetic", vocab_size=7)
    with pytest.raises(ValueError, match="unknown options"):
        load_corpus("synthetic", vocab=64)


# ---------------------------------------------------------------------------------- text:PATH


def test_text_file_char_level_splits_90_5_5(tmp_path: Path):
    path = tmp_path / "a.txt"
    path.write_text(TEXT_SAMPLE, encoding="utf-8")
    corpus = load_corpus(f"text:{path}")
    assert corpus.vocab.level == "char"
    joined = "".join(corpus.vocab.decode(corpus.split(s)) for s in SPLITS)
    assert joined == TEXT_SAMPLE
    n = len(TEXT_SAMPLE)
    assert corpus.train.numel() == int(0.9 * n)
    assert corpus.valid.numel() == int(0.95 * n) - int(0.9 * n)


def test_text_file_word_level_uses_train_vocabulary_with_unk(tmp_path: Path):
    path = tmp_path / "a.txt"
    path.write_text(TEXT_SAMPLE + " zyzzyva" * 20, encoding="utf-8")
    by_option = load_corpus(f"text:{path}", level="word")
    by_spec = load_corpus(f"text:{path}:word")
    assert by_option.vocab == by_spec.vocab and torch.equal(by_option.test, by_spec.test)
    vocab = by_option.vocab
    assert vocab.level == "word" and UNK in vocab.tokens
    assert "zyzzyva" not in vocab.tokens  # only in the test split
    assert (by_option.test == vocab.tokens.index(UNK)).any()
    words = TEXT_SAMPLE.split()
    assert (
        by_option.train.numel() + by_option.valid.numel() + by_option.test.numel()
        == len(words) + 20
    )
    assert vocab.decode(by_option.train[:9]) == " ".join(words[:9])


def test_text_folder_with_wiki_raw_files_uses_them_as_splits(tmp_path: Path):
    splits = {"train": "a b c a b\n" * 10, "valid": "a c d\n", "test": "b b e\n"}
    for s, text in splits.items():
        (tmp_path / f"wiki.{s}.raw").write_text(text, encoding="utf-8")
    chars = load_corpus(f"text:{tmp_path}")
    for s in SPLITS:
        assert chars.vocab.decode(chars.split(s)) == splits[s]
    words = load_corpus(f"text:{tmp_path}:word")
    assert set(words.vocab.tokens) == {"a", "b", "c", UNK}
    assert words.vocab.decode(words.valid) == f"a c {UNK}"
    assert words.vocab.decode(words.test) == f"b b {UNK}"


def test_text_folder_of_txt_files_is_read_recursively_in_sorted_order(tmp_path: Path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "b.txt").write_text("B" * 100, encoding="utf-8")
    (tmp_path / "a.txt").write_text("A" * 100 + "\n", encoding="utf-8")
    (tmp_path / "sub" / "c.txt").write_text("C" * 100 + "\n", encoding="utf-8")
    (tmp_path / "ignored.md").write_text("ignored", encoding="utf-8")
    corpus = load_corpus(f"text:{tmp_path}")
    text = "".join(corpus.vocab.decode(corpus.split(s)) for s in SPLITS)
    assert text == "A" * 100 + "\n" + "B" * 100 + "\n" + "C" * 100 + "\n"


def test_missing_path_raises_file_not_found_naming_it(tmp_path: Path):
    missing = tmp_path / "nope.txt"
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        load_corpus(f"text:{missing}")


def test_non_utf8_file_raises_value_error_naming_it(tmp_path: Path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("café crème ".encode("latin-1") * 50)
    with pytest.raises(ValueError, match=r"latin1\.txt.*UTF-8"):
        load_corpus(f"text:{path}")


def test_empty_or_tiny_corpus_raises_value_error(tmp_path: Path):
    empty = tmp_path / "empty.txt"
    empty.write_text("", encoding="utf-8")
    with pytest.raises(ValueError, match="empty"):
        load_corpus(f"text:{empty}")
    blank = tmp_path / "blank.txt"
    blank.write_text("   \n\n ", encoding="utf-8")
    with pytest.raises(ValueError, match="empty"):
        load_corpus(f"text:{blank}:word")
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("abc", encoding="utf-8")
    with pytest.raises(ValueError, match="too small"):
        load_corpus(f"text:{tiny}")
    folder = tmp_path / "nothing"
    folder.mkdir()
    with pytest.raises(ValueError, match=r"no \*\.txt"):
        load_corpus(f"text:{folder}")


def test_incomplete_split_files_raise_value_error(tmp_path: Path):
    (tmp_path / "wiki.train.raw").write_text("a b c\n" * 10, encoding="utf-8")
    with pytest.raises(ValueError, match="train/valid/test"):
        load_corpus(f"text:{tmp_path}")


def test_unknown_spec_raises_value_error_listing_valid_forms():
    with pytest.raises(ValueError, match=r"shakespeare.*synthetic.*text:PATH"):
        load_corpus("wikitext103")
    with pytest.raises(ValueError, match="level"):
        load_corpus("text:/tmp/x.txt", level="byte")
    with pytest.raises(ValueError, match="no options"):
        load_corpus("shakespeare", seed=1)


def test_the_fingerprint_is_the_content_not_the_spec_or_the_path(tmp_path: Path):
    # Checkpoints keyed by "text:PATH" once survived an edit of the file at PATH.
    text = "to be or not to be, that is the question " * 40
    a, b = tmp_path / "a.txt", tmp_path / "elsewhere" / "b.txt"
    b.parent.mkdir()
    a.write_text(text)
    b.write_text(text)
    first = load_corpus(f"text:{a}").fingerprint
    assert load_corpus(f"text:{b}").fingerprint == first
    a.write_text(text.replace("to be", "ot be", 1))  # same characters, same length
    assert load_corpus(f"text:{a}").vocab == load_corpus(f"text:{b}").vocab
    assert load_corpus(f"text:{a}").fingerprint != first
    assert load_corpus(f"text:{b}:word").fingerprint != first
    corpus = load_corpus(f"text:{b}")
    reordered = Vocabulary(corpus.vocab.tokens[::-1], "char")  # same ids, other characters
    assert Corpus("x", reordered, corpus.train, corpus.valid, corpus.test).fingerprint != first
    moved = Corpus("x", corpus.vocab, corpus.train[:-1],
                   torch.cat([corpus.train[-1:], corpus.valid]), corpus.test)
    assert moved.fingerprint != first  # one token moved from train to valid
    assert load_corpus("synthetic", seed=1).fingerprint != load_corpus("synthetic").fingerprint
