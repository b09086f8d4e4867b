"""Learn a byte-level BPE vocabulary from text, in the format and with the pre-tokenisation of GPT-2's.

Training starts from the 256 bytes and repeatedly merges the most frequent adjacent pair of tokens inside pre-tokens.
Distinct pre-tokens are counted once and weighted by frequency, and pair counts are updated only for the pre-tokens a
merge touches, so one merge costs time in proportion to where the pair occurs, not to the size of the text.
"""

import heapq
from collections import Counter, defaultdict

import regex

from mygpt.bpe import ENDOFTEXT, GPT2_PATTERN, Encoder, bytes_to_unicode, merge_pair


def train_bpe(text_or_iterator, vocab_size, special_tokens=(ENDOFTEXT,), pattern=GPT2_PATTERN):
    """An `Encoder` with `vocab_size` tokens learned from a string or an iterable of strings (e.g. documents).

    Tokens are the 256 bytes, then one per merge, then `special_tokens` (which are cut out of the training text).
    Each merge is the most frequent pair at its step; among equally frequent pairs the one whose (left bytes, right
    bytes) sorts first wins, so training is deterministic. Training stops early, with a smaller vocabulary, if every
    pre-token has become a single token.
    """
    n_learned = vocab_size - 256 - len(special_tokens)
    if n_learned < 0:
        raise ValueError(f"vocab_size {vocab_size} is below the 256 bytes plus {len(special_tokens)} special tokens")
    words = _count_pretokens(text_or_iterator, pattern, special_tokens)
    token_bytes, merges = _learn_merges(words, n_learned)
    alphabet = bytes_to_unicode()
    encoder = {"".join(alphabet[b] for b in data): i for i, data in enumerate(token_bytes)}
    encoder.update((token, len(token_bytes) + i) for i, token in enumerate(special_tokens))
    names = list(encoder)
    return Encoder(encoder, [(names[a], names[b]) for a, b in merges], pattern=pattern)


def _count_pretokens(text_or_iterator, pattern, special_tokens):
    """Counter of each distinct pre-token's UTF-8 bytes."""
    chunks = [text_or_iterator] if isinstance(text_or_iterator, str) else text_or_iterator
    split = regex.compile(pattern).findall
    specials = regex.compile("|".join(map(regex.escape, special_tokens))) if special_tokens else None
    counts = Counter()
    for chunk in chunks:
        for part in specials.split(chunk) if specials else [chunk]:
            counts.update(split(part))
    return Counter({piece.encode("utf-8"): n for piece, n in counts.items()})


class _PairCounts:
    """Weighted counts of adjacent token pairs over all words, with a max-heap to find the most frequent.

    The heap is lazy: a count change pushes a new entry and leaves the old one, which is skipped when it surfaces
    because it no longer matches the count. A popped pair is retired for good: when two merges share a token, a
    merged pair can reappear, and merging it again would only repeat an earlier, lower-ranked merge.
    """

    def __init__(self, token_bytes):
        self.token_bytes = token_bytes
        self.count = defaultdict(int)
        self.heap = []
        self.retired = set()

    def add(self, deltas):
        for pair, delta in deltas.items():
            if delta:
                self.count[pair] += delta
                self._push(pair)

    def _push(self, pair):
        a, b = pair
        n = self.count[pair]
        if n > 0 and pair not in self.retired:
            heapq.heappush(self.heap, (-n, self.token_bytes[a], self.token_bytes[b], pair))
        else:
            del self.count[pair]

    def pop_most_frequent(self):
        """The pair with the highest count (ties: smallest bytes), or None if no pair is left."""
        while self.heap:
            negative, _, _, pair = heapq.heappop(self.heap)
            if self.count.get(pair) == -negative:
                self.retired.add(pair)
                return pair
        return None


def _learn_merges(words, n_learned):
    """(bytes of each token by id, merges as id pairs) after up to `n_learned` new tokens."""
    # Ids 0..255 are the bytes in GPT-2's order, so a trained vocabulary lays out like GPT-2's.
    token_bytes = [bytes([b]) for b in bytes_to_unicode()]
    id_of = {data: i for i, data in enumerate(token_bytes)}
    seqs = [[id_of[bytes([b])] for b in word] for word in words]
    freqs = list(words.values())
    pairs = _PairCounts(token_bytes)
    where = defaultdict(set)  # pair -> indices of words that hold it (or once did: checked on use)
    initial = defaultdict(int)
    for w, seq in enumerate(seqs):
        for pair in zip(seq, seq[1:]):
            initial[pair] += freqs[w]
            where[pair].add(w)
    pairs.add(initial)
    merges = []
    while len(token_bytes) < 256 + n_learned:
        pair = pairs.pop_most_frequent()
        if pair is None:
            break
        data = token_bytes[pair[0]] + token_bytes[pair[1]]
        # Two merges can spell the same bytes ("ab"+"c", "a"+"bc"); they share one token, as in GPT-2's files.
        if data not in id_of:
            id_of[data] = len(token_bytes)
            token_bytes.append(data)
        merges.append(pair)
        _apply_merge(pair, id_of[data], seqs, freqs, where, pairs)
    return token_bytes, merges


def _apply_merge(pair, new_id, seqs, freqs, where, pairs):
    """Merge `pair` into `new_id` in every word that holds it, updating the pair counts by the difference."""
    deltas = defaultdict(int)
    for w in where.pop(pair, ()):
        old = seqs[w]
        new = merge_pair(old, *pair, new_id)
        if len(new) == len(old):
            continue
        seqs[w] = new
        f = freqs[w]
        for p in zip(old, old[1:]):
            deltas[p] -= f
        for p in zip(new, new[1:]):
            deltas[p] += f
            where[p].add(w)
    pairs.add(deltas)

