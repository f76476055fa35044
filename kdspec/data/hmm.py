"""The `hmm` builtin corpus: documents sampled from a fixed random hidden Markov model.

The language (states, transitions, emissions, words) comes from `LANGUAGE_SEED` and is the same
for every split and every user seed; the seed and split only choose which documents are sampled.
Its next-token distribution has real entropy (about 3.3 nats, perplexity 27), so a teacher's
soft targets carry information beyond their argmax, and predicting well needs context to infer
the hidden state: a unigram model pays 1.9 nats/token over the floor, the best bigram model 0.6,
trigram 0.16; four words of context come within 0.01 (docs/data.md has the measurements).

`cross_entropy` runs the forward algorithm: it is the cross-entropy of the Bayes-optimal
predictor, the floor no model trained on this corpus can beat on average.
"""

from __future__ import annotations

import functools
import math
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from . import _random as rnd
from .errors import DataError

LANGUAGE_SEED = 20240611
N_TOPICS = 4  # a document keeps one topic, which must be inferred from its words
LOCAL_STATES = 12  # states per topic; N_STATES = N_TOPICS * LOCAL_STATES
N_STATES = N_TOPICS * LOCAL_STATES
N_WORDS = 256
SUCCESSORS = 3  # nonzero transitions per state: the next state is partly predictable
TRANSITION_ALPHA = 1.0  # Dirichlet concentration of each state's successor weights
EMISSION_SUPPORT = 24  # words a local state can emit; some words are shared between states
EMISSION_ALPHA = 0.5  # Dirichlet concentration of the emission weights
DOC_TOKENS = 256  # words per document

_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"


@dataclass(frozen=True)
class HiddenMarkovModel:
    """A discrete HMM: `initial[i]`, `transition[i][j] = P(j | i)`, `emission[i][w] = P(w | i)`."""

    words: tuple[str, ...]
    initial: tuple[float, ...]
    transition: tuple[tuple[float, ...], ...]
    emission: tuple[tuple[float, ...], ...]

    def __post_init__(self) -> None:
        n, v = len(self.initial), len(self.words)
        rows = [("initial", self.initial, n)]
        rows += [(f"transition[{i}]", r, n) for i, r in enumerate(self.transition)]
        rows += [(f"emission[{i}]", r, v) for i, r in enumerate(self.emission)]
        if len(self.transition) != n or len(self.emission) != n:
            raise ValueError(f"expected {n} transition and emission rows")
        for name, row, width in rows:
            if len(row) != width or min(row) < 0 or abs(sum(row) - 1.0) > 1e-9:
                raise ValueError(f"{name} must be {width} probabilities summing to 1")

    @property
    def n_states(self) -> int:
        return len(self.initial)

    @functools.cached_property
    def _successors(self) -> tuple[tuple[tuple[int, float], ...], ...]:
        """The nonzero entries of each transition row: the forward pass is O(nonzeros)."""
        return tuple(tuple((j, p) for j, p in enumerate(row) if p > 0) for row in self.transition)

    @functools.cached_property
    def _cumulative(self) -> tuple[list[float], list[list[float]], list[list[float]]]:
        """Cumulative initial, transition and emission weights, for sampling by bisection."""
        return (
            rnd.cumulative(self.initial),
            [rnd.cumulative(r) for r in self.transition],
            [rnd.cumulative(r) for r in self.emission],
        )

    def sample(self, rng: random.Random, length: int) -> list[int]:
        """Word ids of one document of `length` tokens, starting from `initial`."""
        cum_init, cum_trans, cum_emit = self._cumulative
        state = rnd.categorical(rng, cum_init)
        out = []
        for t in range(length):
            if t:
                state = rnd.categorical(rng, cum_trans[state])
            out.append(rnd.categorical(rng, cum_emit[state]))
        return out

    def log_likelihood_terms(self, doc: Sequence[int]) -> list[float]:
        """-log p(x_t | x_<t) for every position t, by the normalised forward algorithm.

        With the filtered belief b_{t-1}(i) = P(s_{t-1} = i | x_<t), the predictive state
        distribution is q_t(j) = sum_i b_{t-1}(i) T[i][j] (q_0 = initial), the next-word
        probability p(x_t | x_<t) = sum_j q_t(j) E[j][x_t], and b_t(j) = q_t(j) E[j][x_t] / p.
        """
        terms = []
        prior = list(self.initial)
        for word in doc:
            joint = [q * e[word] for q, e in zip(prior, self.emission, strict=True)]
            p = sum(joint)
            if p <= 0:
                raise ValueError(f"word id {word} has probability 0 under the model")
            terms.append(-math.log(p))
            prior = [0.0] * self.n_states
            for i, b in enumerate(joint):
                if b:
                    for j, t in self._successors[i]:
                        prior[j] += b * t / p
        return terms


def cross_entropy(model: HiddenMarkovModel, docs: Iterable[Sequence[int]]) -> float:
    """Optimal achievable cross-entropy in nats per token on `docs`.

    H = -(1/N) sum_docs sum_t log p(x_t | x_<t), with p the model's own predictive probability
    (forward algorithm), N the number of tokens. Each document is scored from its first token,
    as a model sees it when its context starts at the document boundary. As the documents grow
    long this tends to the entropy rate of the process.
    """
    total, count = 0.0, 0
    for doc in docs:
        terms = model.log_likelihood_terms(doc)
        total += sum(terms)
        count += len(terms)
    if not count:
        raise ValueError("cross_entropy needs at least one token")
    return total / count


def _stationary(transition: Sequence[Sequence[float]], tol: float = 1e-14) -> list[float]:
    """Stationary distribution by power iteration on the lazy chain (I + T) / 2.

    The lazy chain has the same stationary distribution and is aperiodic, so iteration converges
    for any irreducible T.
    """
    n = len(transition)
    sparse = [[(j, t) for j, t in enumerate(row) if t > 0] for row in transition]
    pi = [1.0 / n] * n
    for _ in range(100_000):
        nxt = [0.5 * p for p in pi]
        for i, row in enumerate(sparse):
            for j, t in row:
                nxt[j] += 0.5 * pi[i] * t
        done = sum(abs(a - b) for a, b in zip(nxt, pi, strict=True)) < tol
        pi = nxt
        if done:
            break
    total = sum(pi)
    return [p / total for p in pi]


def _pseudo_words(rng: random.Random, n: int) -> tuple[str, ...]:
    """`n` distinct two-syllable consonant-vowel words such as `kalo`, sorted."""
    syllables = [c + v for c in _CONSONANTS for v in _VOWELS]
    candidates = [a + b for a in syllables for b in syllables]
    return tuple(sorted(rnd.sample(rng, candidates, n)))


def _sparse_row(
    rng: random.Random, support: Sequence[int], width: int, alpha: float
) -> tuple[float, ...]:
    """A probability row of `width` entries, Dirichlet(alpha) on `support` and zero elsewhere."""
    weights = rnd.dirichlet(rng, alpha, len(support))
    row = [0.0] * width
    for j, w in zip(support, weights, strict=True):
        row[j] = w
    total = sum(row)
    return tuple(p / total for p in row)


def _emission_supports(rng: random.Random) -> list[list[int]]:
    """`EMISSION_SUPPORT` distinct words per local state, covering every word at least once.

    A shuffled list of all words fills the slots first (so no word is dead), random words the
    rest; a word drawn twice for one state is replaced by an unused one.
    """
    slots = LOCAL_STATES * EMISSION_SUPPORT
    order = rnd.sample(rng, range(N_WORDS), N_WORDS)
    order += [rnd.randint(rng, 0, N_WORDS - 1) for _ in range(slots - N_WORDS)]
    supports = []
    for s in range(LOCAL_STATES):
        support = list(dict.fromkeys(order[s * EMISSION_SUPPORT : (s + 1) * EMISSION_SUPPORT]))
        spare = [w for w in range(N_WORDS) if w not in support]
        support += rnd.sample(rng, spare, EMISSION_SUPPORT - len(support))
        supports.append(support)
    return supports


def _local_transitions(rng: random.Random) -> list[tuple[float, ...]]:
    """A sparse LOCAL_STATES x LOCAL_STATES chain: a ring (so it is irreducible) plus random
    extra successors, Dirichlet(`TRANSITION_ALPHA`) weights."""
    rows = []
    for i in range(LOCAL_STATES):
        ring = (i + 1) % LOCAL_STATES
        others = rnd.sample(rng, [j for j in range(LOCAL_STATES) if j != ring], SUCCESSORS - 1)
        rows.append(_sparse_row(rng, [ring, *others], LOCAL_STATES, TRANSITION_ALPHA))
    return rows


def make_language(seed: int = LANGUAGE_SEED) -> HiddenMarkovModel:
    """Draw a random sparse topic HMM.

    A state is a pair (topic k, local state s). A document draws its topic uniformly and keeps
    it; within topic k the local state follows that topic's own sparse chain T_k, starting from
    T_k's stationary distribution. Local state s emits from the same `EMISSION_SUPPORT` words in
    every topic, with topic-specific Dirichlet(`EMISSION_ALPHA`) weights: the last word says
    roughly where the chain is, the topic is revealed by the words seen so far. Block-diagonal
    transitions keep the forward algorithm sparse.
    """
    rng = rnd.derive_rng("hmm-language", seed)
    words = _pseudo_words(rng, N_WORDS)
    supports = _emission_supports(rng)
    initial: list[float] = []
    transition: list[tuple[float, ...]] = []
    emission: list[tuple[float, ...]] = []
    for k in range(N_TOPICS):
        local = _local_transitions(rng)
        initial += [p / N_TOPICS for p in _stationary(local)]
        left, right = (0.0,) * (k * LOCAL_STATES), (0.0,) * ((N_TOPICS - 1 - k) * LOCAL_STATES)
        transition += [left + row + right for row in local]
        emission += [_sparse_row(rng, sup, N_WORDS, EMISSION_ALPHA) for sup in supports]
    return HiddenMarkovModel(words, tuple(initial), tuple(transition), tuple(emission))


@functools.cache
def language() -> HiddenMarkovModel:
    """The fixed language of the `hmm` corpus (built once per process)."""
    return make_language(LANGUAGE_SEED)


def vocabulary() -> list[str]:
    """Every word an `hmm` document can contain."""
    return list(language().words)


def sample_documents(*, seed: int, split: str, n: int) -> list[list[int]]:
    """Word ids of `n` documents.

    Train and eval draw from separate seeded streams. No word has probability above 0.43 in any
    state, so a given 256-word document has probability below 1e-94 and the splits cannot share
    a document in practice (a test checks it).
    """
    rnd.check_split(split)
    if n < 0:
        raise DataError(f"n must be >= 0, got {n}")
    model = language()
    rng = rnd.derive_rng("hmm", split, seed)
    return [model.sample(rng, DOC_TOKENS) for _ in range(n)]


def generate(*, seed: int, split: str, n: int) -> list[dict]:
    """`n` records `{"text": "w1 w2 ..."}` of `DOC_TOKENS` space-separated words."""
    words = language().words
    return [
        {"text": " ".join(words[w] for w in doc)}
        for doc in sample_documents(seed=seed, split=split, n=n)
    ]


def entropy_floor(*, n_docs: int = 64, seed: int = 0, split: str = "eval") -> float:
    """Bayes-optimal cross-entropy (nats/token) of the `hmm` corpus, on a sample of documents."""
    return cross_entropy(language(), sample_documents(seed=seed, split=split, n=n_docs))
