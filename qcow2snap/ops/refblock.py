"""New refcount blocks from old ones plus an edit's delta, in bulk
(operations layer).

The transaction (:mod:`.transaction`) writes a new copy of every refcount
block an edit changes.  Adding a block's planned changes
(:class:`~.refdelta.RefcountDelta`) one entry at a time cost two passes of
tens of thousands of Python additions per block; the functions here do it
on whole blocks as integers and byte strings, at C speed:

- :func:`block_plus_delta`: the new counts and the encoded block, with
  every count's range checked (None sends the caller to the per-entry
  route, which reports what is wrong);
- :func:`increases_fit`: whether increases alone can overflow a block,
  told from two byte maxima;
- :func:`increments_of_one` and :func:`any_zero_at`: whether increases
  leave some cluster at exactly one reference (after a create, no entry
  keeps COPIED);
- :func:`freed_indexes`: the clusters a block's changes free;
- :func:`encode_count_lanes`: int64 lanes to big-endian 8/16/32-bit
  entries by strided copies.
"""

from __future__ import annotations

import sys
from array import array
from itertools import compress

from .refdelta import FLIP_SIGN_BIT, repeated_lanes

__all__ = ["FAST_BLOCK_ENTRIES", "any_zero_at", "block_plus_delta", "encode_count_lanes",
           "freed_indexes", "increases_fit", "increments_of_one"]

#: refcount blocks of at least this many entries are computed as integers
#: (:func:`block_plus_delta`); smaller ones (512-byte clusters: 256
#: entries) entry by entry, which costs less than the fixed steps there
FAST_BLOCK_ENTRIES = 2048
#: 2**33 in every 64-bit lane (see :func:`block_plus_delta`)
_LANE_BIAS_BIT = 33
#: byte -> 1 if its top bit is set (the sign byte of a negative int64), else 0
_SIGN_TO_ONE = bytes(b >> 7 for b in range(256))
#: byte -> 1 if it is 0, else 0
_ZERO_TO_ONE = bytes(int(b == 0) for b in range(256))
#: byte -> 1 if it is 1, else 0
_ONE_TO_ONE = bytes(int(b == 1) for b in range(256))
_SIGN_BYTE = 7 if sys.byteorder == "little" else 0


def freed_indexes(delta: array[int], values: array[int], base: int) -> list[int]:
    """``base + i`` for every i where ``delta[i] < 0`` and ``values[i] == 0``
    (the clusters an edit frees in one refcount block; ``values`` int64,
    ``delta`` int64 or signed bytes, of the same length), found on the
    arrays' bytes: the sign bytes of the delta,
    the OR of the value's eight bytes, and a search for the marked
    positions, so the cost follows the freed clusters (a per-entry test of
    every changed count took 3 ms of a 40 ms create)."""
    signs = delta.tobytes() if delta.typecode == "b" else delta.tobytes()[_SIGN_BYTE::8]
    negative = signs.translate(_SIGN_TO_ONE)
    if 1 not in negative:
        return []
    out: list[int] = []
    count = len(values)
    if negative.count(1) <= min(count >> 3, 256):   # a few decreases: test their counts
        i = negative.find(1)
        while i >= 0:
            if not values[i]:
                out.append(base + i)
            i = negative.find(1, i + 1)
        return out
    raw = values.tobytes()
    nonzero = 0
    for k in range(8):
        nonzero |= int.from_bytes(raw[k::8], "little")
    zero = nonzero.to_bytes(count, "little").translate(_ZERO_TO_ONE)
    both = (int.from_bytes(negative, "little")
            & int.from_bytes(zero, "little")).to_bytes(count, "little")
    if both.count(1) > count >> 3:   # many: one pass over the block at C speed
        return list(compress(range(base, base + count), both))
    i = both.find(1)
    while i >= 0:
        out.append(base + i)
        i = both.find(1, i + 1)
    return out




def increases_fit(old: array[int], amounts: array[int], refcount_max: int) -> bool:
    """Whether a block's counts plus amounts that are all signed bytes and
    none negative stay within ``refcount_max``, told from two maxima of
    bytes (the amounts', and the old counts' most significant byte): an
    upper bound, so False means only "not told this way"."""
    if amounts.typecode != "b" or sys.byteorder != "little":
        return False
    raw = amounts.tobytes()
    if 1 in raw.translate(_SIGN_TO_ONE):
        return False
    width = old.itemsize
    top = old.tobytes()[width - 1::width]
    # the old counts are below (their top byte's maximum + 1) << the bits under it
    bound = ((max(top, default=0) + 1) << (8 * (width - 1))) - 1
    return bound + max(raw, default=0) <= refcount_max


def block_plus_delta(old: array[int], delta: array[int],
                      order: int) -> tuple[array[int], bytes] | None:
    """A refcount block plus its planned changes, as (the new counts in an
    int64 array, the encoded block), computed on whole blocks as integers
    instead of one addition per entry (two passes of 32,768 Python
    additions and conversions were 5 ms of a 40 ms create): the old counts
    are widened to 64-bit lanes, the delta (signed lanes) is turned into
    one signed integer, and 2**33 is added to every lane so that no lane
    borrows from the next; a lane then holds 2**33 + the new count, which
    is valid iff its bytes 4-7 are (2, 0, 0, 0) and the count fits the
    width.  None for other widths (only 8-, 16- and 32-bit counts are done
    here, on little-endian hosts) or when a count is out of range: the
    caller then takes the per-entry route, which reports the error."""
    if not 3 <= order <= 5 or sys.byteorder != "little":
        return None
    count = len(delta)
    width = 1 << (order - 3)
    raw_old = old.tobytes()
    lanes = bytearray(8 * count)
    for k in range(width):
        lanes[k::8] = raw_old[k::width]
    raw_delta = delta.tobytes()
    if delta.typecode == "b":
        # amounts -128..127 plus 128 are the bytes 0..255 (the sign bit
        # flipped), and the bias takes the 128 back: two integers, not four
        biased = bytearray(8 * count)
        biased[0::8] = raw_delta.translate(FLIP_SIGN_BIT)
        total = (int.from_bytes(lanes, "little") + int.from_bytes(biased, "little")
                 + repeated_lanes(count, (1 << _LANE_BIAS_BIT) - 128))
    else:
        signs = bytearray(8 * count)
        signs[0::8] = raw_delta[7::8].translate(_SIGN_TO_ONE)
        signed_delta = (int.from_bytes(raw_delta, "little")
                        - (int.from_bytes(signs, "little") << 64))
        total = (int.from_bytes(lanes, "little") + signed_delta
                 + repeated_lanes(count, 1 << _LANE_BIAS_BIT))
    if total < 0:
        return None
    try:
        new = bytearray(total.to_bytes(8 * count, "little"))
    except OverflowError:
        return None
    if new[4::8].count(2) != count:
        return None
    new[4::8] = bytes(count)
    encoded = encode_count_lanes(new, order)
    if encoded is None:
        return None
    values = array("q")
    values.frombytes(new)
    return values, encoded


def encode_count_lanes(lanes: bytes | bytearray, order: int) -> bytes | None:
    """A refcount block of 8-, 16- or 32-bit counts encoded from the
    little-endian int64 lanes of its counts by strided byte copies, or None
    if a count is negative or past the width (any byte above the width not
    zero)."""
    count = len(lanes) >> 3
    width = 1 << (order - 3)
    for k in range(width, 8):
        if lanes[k::8].count(0) != count:
            return None
    encoded = bytearray(width * count)
    for k in range(width):      # big-endian entries
        encoded[width - 1 - k::width] = lanes[k::8]
    return bytes(encoded)


def increments_of_one(amounts: array[int]) -> bytes | None:
    """For a delta chunk that only increases counts: one byte per cluster,
    1 where its amount is exactly 1 (b"" when none is).  None when some
    amount is negative or the chunk is not signed bytes (not told this
    way)."""
    if amounts.typecode != "b":
        return None
    raw = amounts.tobytes()
    if 1 in raw.translate(_SIGN_TO_ONE):
        return None
    ones = raw.translate(_ONE_TO_ONE)
    return ones if 1 in ones else b""


def any_zero_at(counts: array[int], marks: bytes) -> bool:
    """Whether some count is 0 where ``marks`` (one byte per count) is 1:
    the counts' bytes ORed as integers, at C speed."""
    raw = counts.tobytes()
    width = counts.itemsize
    nonzero = 0
    for k in range(width):
        nonzero |= int.from_bytes(raw[k::width], "little")
    zero = nonzero.to_bytes(len(counts), "little").translate(_ZERO_TO_ONE)
    return bool(int.from_bytes(zero, "little") & int.from_bytes(marks, "little"))
