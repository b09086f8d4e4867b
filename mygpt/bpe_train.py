"""Learn a byte-level BPE vocabulary from text, in the format and with the pre-tokenisation of GPT-2's.

Training starts from the 256 bytes and repeatedly merges the most frequent adjacent pair of tokens inside pre-tokens.
Distinct pre-tokens are counted once and weighted by frequency, and pair counts are updated only for the pre-tokens a
merge touches, so one merge costs time in proportion to where the pair occurs, not to the size of the text.
A long pre-token (base64, DNA, minified code) keeps the positions of each of its pairs, so that a merge touches only
where the pair occurs in it, not the whole pre-token.
"""

import heapq
from collections import Counter, defaultdict

import regex

from mygpt.bpe import ENDOFTEXT, GPT2_PATTERN, Encoder, _compiled, _int_arg, _require_str, bytes_to_unicode, merge_pair

# Pre-tokens of more bytes than this keep their pairs' positions (see _LongWord); a shorter one is merged and
# recounted whole, which is cheaper for a few bytes.
_LONG_WORD_BYTES = 16


def train_bpe(text_or_iterator, vocab_size, special_tokens=(ENDOFTEXT,), pattern=GPT2_PATTERN):
    """An `Encoder` with `vocab_size` tokens learned from a string or an iterable of strings (e.g. documents).

    Tokens are the 256 bytes, then one per merge, then `special_tokens` (which are cut out of the training text).
    Each merge is the most frequent pair at its step; among equally frequent pairs the one whose (left bytes, right
    bytes) sorts first wins, so training is deterministic. Training stops early, with a smaller vocabulary, if every
    pre-token has become a single token.
    """
    special_tokens = _checked_special_tokens(special_tokens)
    vocab_size = _int_arg(vocab_size, "vocab_size")
    n_learned = vocab_size - 256 - len(special_tokens)
    if n_learned < 0:
        raise ValueError(f"vocab_size {vocab_size} is below the 256 bytes plus {len(special_tokens)} special tokens; "
                         f"pass at least {256 + len(special_tokens)}")
    words = _count_pretokens(text_or_iterator, _compiled(pattern, "pattern"), special_tokens)
    token_bytes, merges = _learn_merges(words, n_learned)
    alphabet = bytes_to_unicode()
    encoder = {"".join(alphabet[b] for b in data): i for i, data in enumerate(token_bytes)}
    names = list(encoder)
    for token in special_tokens:
        if token in encoder:
            raise ValueError(f"special token {token!r} is also the learned token {encoder[token]}: the two would share "
                             "one entry of the vocabulary; choose a special token that cannot be ordinary text, "
                             "such as '<|name|>'")
    encoder.update((token, len(token_bytes) + i) for i, token in enumerate(special_tokens))
    return Encoder(encoder, [(names[a], names[b]) for a, b in merges], pattern=pattern)


def _checked_special_tokens(special_tokens):
    """`special_tokens` as a tuple of distinct non-empty str, or an error naming the argument."""
    if isinstance(special_tokens, str) or not isinstance(special_tokens, (list, tuple, set, frozenset)):
        raise TypeError(f"special_tokens must be a list of str such as ['<|endoftext|>'], got {special_tokens!r}")
    tokens = tuple(special_tokens)
    for k, token in enumerate(tokens):
        _require_str(token, f"special_tokens[{k}]")
        if not token:
            raise ValueError(f"special_tokens[{k}] is empty; a special token needs text to be found by")
    repeated = sorted(t for t, n in Counter(tokens).items() if n > 1)
    if repeated:
        raise ValueError(f"special_tokens lists {repeated} more than once")
    return tokens


def _count_pretokens(text_or_iterator, pattern, special_tokens):
    """Counter of each distinct pre-token's UTF-8 bytes."""
    if isinstance(text_or_iterator, (bytes, bytearray)) or not hasattr(text_or_iterator, "__iter__"):
        raise TypeError(f"text_or_iterator must be a str or an iterable of str, got "
                        f"{type(text_or_iterator).__name__}; decode bytes to text first")
    chunks = [text_or_iterator] if isinstance(text_or_iterator, str) else text_or_iterator
    # Longest first, so that a special token inside a longer one does not cut it.
    by_length = sorted(special_tokens, key=len, reverse=True)
    specials = regex.compile("|".join(map(regex.escape, by_length))) if special_tokens else None
    counts = Counter()
    for k, chunk in enumerate(chunks):
        _require_str(chunk, f"text_or_iterator item {k}")
        for part in specials.split(chunk) if specials else [chunk]:
            counts.update(pattern.findall(part))
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
    seqs = [_LongWord(seq) if len(seq) > _LONG_WORD_BYTES else seq for seq in seqs]
    freqs = list(words.values())
    pairs = _PairCounts(token_bytes)
    where = defaultdict(set)  # pair -> indices of words that hold it (or once did: checked on use)
    initial = defaultdict(int)
    for w, seq in enumerate(seqs):
        for pair in seq.pairs() if isinstance(seq, _LongWord) else zip(seq, seq[1:]):
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
        if isinstance(old, _LongWord):
            for p in old.merge(pair, new_id, freqs[w], deltas):
                where[p].add(w)
            continue
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



class _LongWord:
    """A long pre-token as a linked list of parts, with the positions where each pair of adjacent parts occurs.

    A merge visits only the positions of its pair (left to right, as `merge_pair` scans), so its cost follows the
    pair's occurrences instead of the pre-token's length. Positions go stale as parts merge and are checked on use.
    """

    def __init__(self, ids):
        self.ids = list(ids)
        n = self.n = len(ids)
        self.after = list(range(1, n + 1))  # after[i]: the part following part i (n: none)
        self.before = list(range(-1, n - 1))  # before[i]: the part preceding part i (-1: none)
        self.at = defaultdict(list)  # pair -> positions of its left part
        for i, pair in enumerate(zip(ids, ids[1:])):
            self.at[pair].append(i)

    def pairs(self):
        """Every pair of adjacent parts, one per occurrence."""
        return zip(self.ids, self.ids[1:])

    def merge(self, pair, new_id, freq, deltas):
        """Merge each occurrence of `pair` into `new_id`, adding the change of each pair's count, weighted by
        `freq`, to `deltas`. Returns the pairs the merge created."""
        ids, after, before, n = self.ids, self.after, self.before, self.n
        left, right = pair
        created = set()
        for i in sorted(self.at.pop(pair, ())):
            j = after[i]
            if ids[i] != left or j == n or ids[j] != right:
                continue
            deltas[pair] -= freq
            h, k = before[i], after[j]
            ids[i], ids[j] = new_id, -1  # part j joins part i; -1 marks it gone
            after[i] = k
            if h >= 0:
                self._replace(h, (ids[h], left), (ids[h], new_id), freq, deltas, created)
            if k < n:
                before[k] = i
                self._replace(i, (right, ids[k]), (new_id, ids[k]), freq, deltas, created)
        return created

    def _replace(self, i, old, new, freq, deltas, created):
        deltas[old] -= freq
        deltas[new] += freq
        self.at[new].append(i)
        created.add(new)
