"""MaxEnt-TS: maximum-entropy tree search over tokens with state-cached rollouts.

Each rollout (one iteration) runs four phases on a tree whose root is the prompt and whose nodes
are generated tokens:

1. selection: from the root, step to a child until reaching a terminal node or a node not yet
   visited; a node's unvisited children are taken first (most probable first), then either
   Boltzmann sampling with probability proportional to ``pi(c) exp(V(c) / lam)`` (the optimal
   policy of the soft backup below) or UCT, ``argmax V(c) + uct_c sqrt(ln N(node) / N(c))``;
2. expansion: a visited, non-terminal leaf gets its ``top_k`` most probable next tokens as children;
3. rollout: from a new node, generation continues to ``max_new_tokens`` generated tokens in all
   (or EOS), starting from the node's cached ``DecodeState`` so the prefix is never re-run, and
   the finished sequence is scored by the pluggable reward;
4. backup: the new node's value is its reward, and every ancestor's value is the soft Bellman
   backup (Xiao et al. 2019, "Maximum Entropy Monte-Carlo Planning", with the model as prior)

       V(node) = lam * log sum_c pi(c) exp(V(c) / lam),

   a log-mean-exp with temperature ``lam`` over the visited children, pi the model's
   probabilities renormalised over them. It lies between the children's min and max, tends to
   the max as lam -> 0 and to the pi-weighted mean as lam -> infinity (the inverse temperature
   of the issue's wording is 1 / lam).

A node is terminal when its token is EOS (with ``early_stopping``) or it is the
``max_new_tokens``-th generated token; terminal nodes are scored, never expanded. With
``use_cache=False`` no state is kept: every next-token distribution comes from a full forward
pass over its whole prefix, the reference for the cache's speed at the same search.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch.nn import functional as F

from bk.decode import (
    CachedCursor,
    RecomputeCursor,
    Sampling,
    check_count,
    check_eos,
    check_model,
    continue_from,
    step_function,
    step_work,
)
from bk.model import DecodeState, LanguageModel, Work

Reward = Callable[[torch.Tensor], float]  # full sequence (prompt, then generated) -> reward

SELECTIONS = ("boltzmann", "uct")


@dataclass(frozen=True)
class SearchConfig:
    rollouts: int = 10
    max_new_tokens: int = 50  # generated tokens per sequence, tree path plus rollout
    top_k: int = 5  # children per expanded node
    lam: float = 1.0  # temperature of the soft backup and of Boltzmann selection, > 0
    early_stopping: bool = True  # a sequence ends at eos_id (ignored when eos_id is None)
    eos_id: int | None = None
    selection: str = "boltzmann"  # or "uct"
    uct_c: float = 1.0  # UCT exploration constant
    temperature: float = 1.0  # rollout sampling temperature; 0 = greedy rollouts
    seed: int = 0  # seeds Boltzmann selection and rollout sampling
    use_cache: bool = True  # per-node DecodeState cache; False recomputes every prefix
    kernel: bool = True  # cached steps by bk.step_kernel (plain LanguageModel) or model.step

    def __post_init__(self) -> None:
        check_count("rollouts", self.rollouts, 1)
        check_count("max_new_tokens", self.max_new_tokens, 1)
        check_count("top_k", self.top_k, 1)
        for name in ("lam", "uct_c"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"SearchConfig.{name} must be a finite number > 0, got {value!r}")
        if self.selection not in SELECTIONS:
            raise ValueError(f"SearchConfig.selection must be one of {SELECTIONS}, got "
                             f"{self.selection!r}")

    @property
    def stop_id(self) -> int | None:
        return self.eos_id if self.early_stopping else None


@dataclass(eq=False)
class Node:
    """A generated token. ``logits`` ``(1, V)`` (next-token logits after it) and ``state`` are
    cached on first use when the search runs with the cache."""

    token: int | None  # None at the root
    prior: float  # model probability of ``token`` after the parent's prefix
    depth: int  # generated tokens up to and including this one
    terminal: bool
    parent: Node | None = None
    children: list[Node] = field(default_factory=list)
    visits: int = 0
    value: float | None = None
    logits: torch.Tensor | None = None
    state: DecodeState | None = None

    def path(self) -> list[int]:
        """Generated tokens from the root down to this node."""
        tokens, node = [], self
        while node.token is not None:
            tokens.append(node.token)
            node = node.parent
        return tokens[::-1]

    def walk(self) -> Iterator[Node]:
        yield self
        for child in self.children:
            yield from child.walk()


def soft_value(values: Sequence[float], priors: Sequence[float], lam: float) -> float:
    """``lam * log sum_c pi_c exp(V_c / lam)`` with ``pi = priors / sum(priors)``.

    Written as ``M + lam * log1p(sum_c pi_c expm1((V_c - M) / lam))`` with ``M = max V``: every
    term is in [-1, 0], so nothing overflows as lam -> 0 and nothing cancels as lam -> infinity.
    """
    if len(values) != len(priors) or not values:
        raise ValueError(f"need one prior per value and at least one value, got {len(values)} "
                         f"values and {len(priors)} priors")
    if not all(math.isfinite(v) for v in values):
        raise ValueError(f"values must be finite, got {list(values)}")
    if not all(math.isfinite(p) and p > 0 for p in priors):
        raise ValueError(f"priors must be finite and > 0, got {list(priors)}")
    if not math.isfinite(lam) or lam <= 0:
        raise ValueError(f"lam must be a finite number > 0, got {lam!r}")
    top = max(values)
    total = math.fsum(priors)
    terms = (p * math.expm1((v - top) / lam) for v, p in zip(values, priors, strict=True))
    s = math.fsum(terms) / total
    return top + lam * math.log1p(s)


class LogLikelihoodReward:
    """Mean log-likelihood, nats per token, of the tokens after the first ``prompt_length``
    under a (second) scoring model."""

    def __init__(self, model: LanguageModel, prompt_length: int) -> None:
        check_model(model)
        check_count("prompt_length", prompt_length, 1)
        self.model, self.prompt_length = model, prompt_length

    @torch.no_grad()
    def __call__(self, tokens: torch.Tensor) -> float:
        p = self.prompt_length
        if tokens.dim() != 1 or tokens.shape[0] <= p:
            raise ValueError(f"expected a 1-D sequence longer than the prompt ({p} tokens), got "
                             f"shape {tuple(tokens.shape)}")
        logp = F.log_softmax(self.model(tokens[None, :-1]).logits[0, p - 1:].double(), dim=-1)
        return float(logp.gather(1, tokens[p:, None]).mean())


@dataclass
class Rollout:
    tokens: torch.Tensor  # (P + T,) prompt, then generated tokens
    reward: float


@dataclass
class SearchResult:
    best: Rollout  # the highest-reward sequence found (the first, on ties)
    rollouts: list[Rollout]
    root: Node
    work: Work  # model work executed by the search (the reward's own work is not counted)


class MaxEntTS:
    """One search from ``prompt`` ``(P,)``; ``run`` performs ``config.rollouts`` rollouts."""

    def __init__(self, model: LanguageModel, prompt: torch.Tensor, reward: Reward,
                 config: SearchConfig | None = None) -> None:
        check_model(model)
        self.config = config or SearchConfig()
        cfg = self.config
        if not isinstance(prompt, torch.Tensor) or prompt.dim() != 1:
            raise ValueError(f"prompt must be a 1-D tensor of token ids, got "
                             f"{getattr(prompt, 'shape', type(prompt).__name__)}")
        model.check_tokens(prompt[None])
        check_eos(cfg.eos_id, model.cfg.vocab_size)
        if cfg.top_k > model.cfg.vocab_size:
            raise ValueError(f"top_k={cfg.top_k} exceeds the vocabulary size "
                             f"{model.cfg.vocab_size}")
        if not callable(reward):
            raise TypeError(f"reward must be callable on a token sequence, got "
                            f"{type(reward).__name__}")
        self.model, self.prompt, self.reward = model, prompt, reward
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.sampling = Sampling(cfg.temperature, None, self.generator)
        self.sampling.check(model.cfg.vocab_size)
        self.work = Work()
        self.rollouts: list[Rollout] = []
        self.root = Node(token=None, prior=1.0, depth=0, terminal=False)
        if cfg.use_cache:
            self.step = step_function(model, cfg.kernel)
            with torch.no_grad():
                cursor = CachedCursor.start(model, prompt[None], self.step)
            self.root.logits, self.root.state = cursor.logits, cursor.state
            self.work = self.work + cursor.work

    def prefix(self, node: Node) -> torch.Tensor:
        """Prompt and the node's path, ``(1, P + depth)``."""
        path = torch.tensor(node.path(), dtype=torch.int64)
        return torch.cat([self.prompt, path])[None]

    def cache(self, node: Node) -> None:
        """Compute and keep the node's state and logits by one step from its parent's state."""
        if node.state is None:
            token = torch.tensor([node.token], dtype=torch.int64)
            node.logits, node.state = self.step(token, node.parent.state)
            self.work = self.work + step_work(1, len(node.state.g))

    def next_logits(self, node: Node) -> torch.Tensor:
        if self.config.use_cache:
            self.cache(node)
            return node.logits
        cursor = RecomputeCursor(self.model, self.prefix(node))
        self.work = self.work + cursor.work
        return cursor.logits

    def expand(self, node: Node) -> None:
        if node.terminal or node.children:
            raise ValueError("only a non-terminal node without children can be expanded")
        cfg = self.config
        logits = self.next_logits(node)[0]
        if not bool(torch.isfinite(logits).all()):
            raise FloatingPointError("the model produced NaN or infinite logits")
        probs = torch.softmax(logits.double(), dim=-1)
        order = torch.sort(probs, descending=True, stable=True).indices[:cfg.top_k]
        for token in order.tolist():
            ended = token == cfg.stop_id or node.depth + 1 == cfg.max_new_tokens
            node.children.append(Node(token, float(probs[token]), node.depth + 1, ended, node))

    def select(self, node: Node) -> Node:
        for child in node.children:
            if child.visits == 0:
                return child
        cfg = self.config
        if cfg.selection == "uct":
            scores = [c.value + cfg.uct_c * math.sqrt(math.log(node.visits) / c.visits)
                      for c in node.children]
            return node.children[max(range(len(scores)), key=scores.__getitem__)]
        weights = torch.tensor([math.log(c.prior) + c.value / cfg.lam for c in node.children],
                               dtype=torch.float64)
        pick = torch.multinomial(torch.softmax(weights, dim=0), 1, generator=self.generator)
        return node.children[int(pick)]

    def descend(self) -> Node:
        """Selection and expansion: the node this iteration scores."""
        node = self.root
        while not node.terminal:
            if not node.children:
                if node.visits == 0 and node is not self.root:
                    return node
                self.expand(node)
            node = self.select(node)
        return node

    def score(self, node: Node) -> Rollout:
        """The node's sequence (rolled out from its state unless terminal) and its reward."""
        if node.terminal:
            tokens = self.prefix(node)[0]
        else:
            remaining = self.config.max_new_tokens - node.depth
            if self.config.use_cache:
                self.cache(node)
                cursor = CachedCursor(self.model, node.logits, node.state, self.step)
            else:
                cursor = RecomputeCursor(self.model, self.prefix(node))
            tokens = continue_from(cursor, self.prefix(node), remaining, self.sampling,
                                   self.config.stop_id).tokens[0]
            self.work = self.work + cursor.work
        reward = float(self.reward(tokens))
        if not math.isfinite(reward):
            raise ValueError(f"the reward returned {reward} for the sequence {tokens.tolist()}; "
                             "rewards must be finite")
        return Rollout(tokens, reward)

    def backup(self, node: Node, reward: float) -> None:
        node.visits += 1
        node.value = reward
        while node.parent is not None:
            node = node.parent
            node.visits += 1
            seen = [c for c in node.children if c.visits]
            node.value = soft_value([c.value for c in seen], [c.prior for c in seen],
                                    self.config.lam)

    @torch.no_grad()
    def run(self) -> SearchResult:
        for _ in range(self.config.rollouts):
            node = self.descend()
            rollout = self.score(node)
            self.backup(node, rollout.reward)
            self.rollouts.append(rollout)
        best = max(self.rollouts, key=lambda r: r.reward)
        return SearchResult(best, self.rollouts, self.root, self.work)


def maxent_ts(model: LanguageModel, prompt: torch.Tensor, reward: Reward,
              config: SearchConfig | None = None) -> SearchResult:
    """Run MaxEnt-TS from ``prompt`` ``(P,)``; see the module docstring."""
    return MaxEntTS(model, prompt, reward, config).run()
