"""
The training order: which example comes at each position of each epoch, as a pure function.

`EpochOrder(seed, epoch, n)[positions]` is a random permutation of range(n), different for every
(seed, epoch), computed for just the positions asked for: nothing proportional to n is ever built,
so an epoch over 10^10 windows starts as fast, and takes as little memory, as one over 10.

It is a bijection made of a 4-round Feistel network on the integers below the smallest even power
of two >= n, keyed by (seed, epoch); values that land >= n are passed through the network again
("cycle walking"), which keeps it a bijection onto range(n). Each round mixes one half of the bits
with a hash of the other half, the standard way to build a keyed permutation of a range.
"""

import numpy as np

_ROUNDS = 4
_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _mix(x):
    """splitmix64's finaliser: a fast, well-mixing hash of uint64 values (numpy arrays)."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


class EpochOrder:
    """A random permutation of range(n) for (seed, epoch), evaluated lazily at any positions."""

    def __init__(self, seed, epoch, n, tag=0):
        if n < 1:
            raise ValueError(f"cannot order an empty dataset (n={n})")
        self.n = int(n)
        self.half_bits = max(1, (int(self.n - 1).bit_length() + 1) // 2)  # the domain is 4**half_bits >= n
        self.half_mask = np.uint64((1 << self.half_bits) - 1)
        keys = np.random.default_rng([seed, tag, epoch]).integers(0, 2**63, size=_ROUNDS, dtype=np.int64)
        self.keys = keys.astype(np.uint64)

    def _feistel(self, x):
        left, right = x >> np.uint64(self.half_bits), x & self.half_mask
        for key in self.keys:
            left, right = right, left ^ (_mix(right ^ key) & self.half_mask)
        return (left << np.uint64(self.half_bits)) | right

    def __getitem__(self, positions):
        """The example indices at the given positions (ints in [0, n)); an int or an array of them."""
        scalar = np.isscalar(positions)
        x = np.atleast_1d(np.asarray(positions, dtype=np.uint64))
        if x.size and int(x.max()) >= self.n:
            raise IndexError(f"position {int(x.max())} is outside an epoch of {self.n} examples")
        with np.errstate(over="ignore"):  # the hash multiplies modulo 2**64 on purpose
            x = self._feistel(x)
            outside = x >= np.uint64(self.n)
            while outside.any():  # at most a few passes: the domain is less than 4n
                x[outside] = self._feistel(x[outside])
                outside = x >= np.uint64(self.n)
        x = x.astype(np.int64)
        return int(x[0]) if scalar else x

    def __len__(self):
        return self.n


def micro_batches_in_step(n, step_start, batch_size, grad_accum_steps=1, world_size=1):
    """How many micro-batches a process takes in the step that starts at position step_start of an epoch of n.

    Alone, an epoch is each example once: its last step takes only the micro-batches that examples remain
    for, the last of them short. With several processes every step is whole (see epoch_batches).
    """
    if world_size > 1:
        return grad_accum_steps
    return min(grad_accum_steps, -(-(n - step_start) // batch_size))


def epoch_batches(order, start, batch_size, grad_accum_steps=1, world_size=1, rank=0):
    """Process `rank`'s micro-batches (lists of example indices) for the rest of an epoch, from position start.

    Step s of the epoch takes the next batch_size * grad_accum_steps * world_size positions of the order;
    micro-batch m of process r is slice m * world_size + r of that chunk. So one process with a k-times
    larger batch sees exactly the examples that k micro-batches, or k processes, see together, and the
    processes never share an example within an epoch. A single process ends the epoch with a short last
    batch; several processes fill their last step by wrapping to the start of the order, since DDP needs
    every process to take part in every step. Batches are computed as they are consumed.
    """
    n, B, W = len(order), batch_size, world_size
    global_batch = B * grad_accum_steps * W
    steps = -(-n // global_batch)  # ceil
    for step_start in range(start, steps * global_batch, global_batch):
        for m in range(micro_batches_in_step(n, step_start, B, grad_accum_steps, W)):
            first = step_start + (m * W + rank) * B
            last = first + B if W > 1 else min(first + B, n)
            yield order[[i % n for i in range(first, last)]].tolist()
