"""Damaged and hostile images (the robustness contract).

"A corrupt or hostile image gives one clear Qcow2Error, never a traceback,
a hang, unbounded memory, or a write.  Reading never modifies an image."

* :func:`exercise` does everything a reader does with an image (info, every
  layer's extents, every layer's whole disk, every VM state) and may only
  succeed or raise a :class:`~qcow2snap.errors.Qcow2Error`; it runs under a
  SIGALRM time limit and the image's bytes and mtime must not change.
* Hypothesis mutates 1-8 bytes of small fixtures (biased towards metadata:
  header, extensions, L1/L2 tables, refcount table, snapshot table,
  compressed data) and truncates them, and runs :func:`exercise` on each.
* A deterministic corpus of targeted corruptions (QEMU's iotest 080 and
  more) pins the exception class and QEMU's wording; the ``qemu`` oracle
  test checks that qemu-img refuses the same images.
* The CLI turns each open-time corruption into exactly one stderr line.

Damaged images are always made here by patching a copy of a good fixture
(``struct.pack_into`` on a ``bytearray``); no damaged blob is stored.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import itertools
import json
import os
import re
import signal
import struct
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from conftest import FIXTURES_BY_NAME, fixture_path, place_companion
from helpers import invoke
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import qcow2snap
from qcow2snap import describe
from qcow2snap.errors import (
    CorruptImageError,
    NotQcow2Error,
    Qcow2Error,
    UnsupportedImageError,
)
from qcow2snap.ops import inspection
from qcow2snap.reader import DiskReader, ExtentKind

# ---------------------------------------------------------------------------
# exercise(): everything a reader does, bounded in time and work
# ---------------------------------------------------------------------------

READ_CHUNK = 1 << 20
#: A damaged size field may claim petabytes of (legitimately) unallocated
#: disk; reading zeros that long proves nothing, so reads stop here and the
#: last chunk is read as well.
MAX_READ_PER_LAYER = 256 << 20
#: Layers fully exercised per image (a damaged nb_snapshots may give 65536).
MAX_LAYERS = 12
MAX_EXTENTS = 200_000
TIME_LIMIT = 20.0  # seconds per exercise(); clean fixtures take < 0.3 s

DAMAGED_NAME = "damaged.qcow2"


class _TimeLimitExceeded(BaseException):
    """Raised by SIGALRM inside the code under test.  A BaseException, so an
    ``except Exception`` in the library cannot swallow it."""


@contextlib.contextmanager
def time_limit(seconds: float, what: str) -> Iterator[None]:
    def on_alarm(signum: int, frame: Any) -> None:
        raise _TimeLimitExceeded()

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    except _TimeLimitExceeded:
        raise AssertionError(f"{what}: no result within {seconds} s (hang?)") from None
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _read_through(reader: DiskReader) -> None:
    """Read a whole layer (or VM state) in 1 MiB chunks, up to the cap."""
    total = 0
    while total < MAX_READ_PER_LAYER:
        chunk = reader.read(READ_CHUNK)
        if not chunk:
            break
        assert len(chunk) <= READ_CHUNK
        total += len(chunk)
    if reader.size <= MAX_READ_PER_LAYER:
        assert total == reader.size, "short read of a layer that reads without error"
    else:
        reader.seek(-min(READ_CHUNK, reader.size), os.SEEK_END)
        assert len(reader.read(READ_CHUNK)) == min(READ_CHUNK, reader.size)


def _exercise_layer(image: qcow2snap.Qcow2Image, snapshot: qcow2snap.Snapshot | None) -> None:
    for _ in itertools.islice(image.extents(snapshot), MAX_EXTENTS):
        pass
    if image.encrypted:
        return
    with image.open_disk(snapshot) as disk:
        _read_through(disk)
    if snapshot is not None and snapshot.has_vm_state:
        with image.open_vm_state(snapshot) as vm_state:
            _read_through(vm_state)


def exercise(path: Path | str, *, keep_going: bool = False) -> None:
    """Open ``path`` (with the default lock probe), read all its metadata and
    info, open its backing chain, then list the extents of and read the
    active layer and every snapshot (and every VM state).

    Raises the first :class:`Qcow2Error`.  With ``keep_going`` an error in one
    step (the chain, a layer) does not stop the others, so more code is
    exercised per damaged image; the first error is raised at the end.
    """
    errors: list[Qcow2Error] = []

    def attempt(step: Callable[[], object]) -> None:
        try:
            step()
        except Qcow2Error as exc:
            if not keep_going:
                raise
            errors.append(exc)

    with qcow2snap.open(path) as image:
        assert image.header.version in (2, 3)
        _ = (image.extensions, image.feature_names, image.snapshots, image.backing_file_name,
             image.backing_format, image.data_file_name, image.unknown_extensions)
        info = describe.image_info_json(inspection.image_facts(image))
        assert info["virtual-size"] == image.size
        describe.info_text(inspection.image_facts(image))
        if image.snapshots:
            describe.snapshot_table_text(list(inspection.snapshot_facts(image)))
        attempt(image.chain)  # describe reports chain errors as text: see them raised here
        for snapshot in [None, *image.snapshots[:MAX_LAYERS]]:
            attempt(functools.partial(_exercise_layer, image, snapshot))
    if errors:
        raise errors[0]


def _file_state(path: Path) -> tuple[str, int, int]:
    st_ = path.stat()
    return hashlib.sha256(path.read_bytes()).hexdigest(), st_.st_size, st_.st_mtime_ns


@contextlib.contextmanager
def unchanged(*paths: Path) -> Iterator[None]:
    """Assert that the files' bytes, size and mtime are the same afterwards."""
    before = {p: _file_state(p) for p in paths}
    try:
        yield
    finally:
        for p in paths:
            assert _file_state(p) == before[p], f"{p.name} was modified by reading it"


def exercise_checked(path: Path, companions: tuple[Path, ...] = (),
                     *, keep_going: bool = False) -> Qcow2Error | None:
    """:func:`exercise` under the time limit and the no-write check; returns
    the Qcow2Error it raised, or None.  Any other exception propagates."""
    with unchanged(path, *companions), time_limit(TIME_LIMIT, f"exercise({path.name})"):
        try:
            exercise(path, keep_going=keep_going)
        except Qcow2Error as exc:
            assert str(exc), "a Qcow2Error without a message"
            return exc
    return None


# ---------------------------------------------------------------------------
# Reading a clean image's layout (struct only, independent of the library)
# ---------------------------------------------------------------------------

@dataclass
class Layout:
    """Offsets of the metadata of a (clean) image, from its bytes."""

    data: bytes
    version: int = 0
    backing_file_offset: int = 0
    backing_file_size: int = 0
    cluster_bits: int = 0
    size: int = 0
    l1_size: int = 0
    l1_table_offset: int = 0
    refcount_table_offset: int = 0
    refcount_table_clusters: int = 0
    nb_snapshots: int = 0
    snapshots_offset: int = 0
    incompatible_features: int = 0
    header_length: int = 72
    snapshot_entries: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        (magic, self.version, self.backing_file_offset, self.backing_file_size,
         self.cluster_bits, self.size, _crypt, self.l1_size, self.l1_table_offset,
         self.refcount_table_offset, self.refcount_table_clusters, self.nb_snapshots,
         self.snapshots_offset) = struct.unpack_from(">4sIQIIQIIQQIIQ", self.data, 0)
        assert magic == b"QFI\xfb"
        if self.version == 3:
            self.incompatible_features = self.u64(72)
            self.header_length = self.u32(100)
        pos = self.snapshots_offset
        for _ in range(self.nb_snapshots):
            pos = (pos + 7) & ~7
            self.snapshot_entries.append(pos)
            extra, id_len, name_len = self.u32(pos + 36), self.u16(pos + 12), self.u16(pos + 14)
            pos += 40 + extra + id_len + name_len

    def u16(self, off: int) -> int:
        return int(struct.unpack_from(">H", self.data, off)[0])

    def u32(self, off: int) -> int:
        return int(struct.unpack_from(">I", self.data, off)[0])

    def u64(self, off: int) -> int:
        return int(struct.unpack_from(">Q", self.data, off)[0])

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    @property
    def extended_l2(self) -> bool:
        return bool(self.incompatible_features & 16)

    @property
    def l2_entry_size(self) -> int:
        return 16 if self.extended_l2 else 8

    def extensions(self) -> list[tuple[int, int, int]]:
        """(type, offset of its 8-byte header, data length), end marker excluded."""
        out = []
        pos = self.header_length
        end = self.backing_file_offset or self.cluster_size
        while pos + 8 <= end:
            ext_type, length = struct.unpack_from(">II", self.data, pos)
            if ext_type == 0:
                break
            out.append((ext_type, pos, length))
            pos += 8 + ((length + 7) & ~7)
        return out

    def extension(self, ext_type: int) -> tuple[int, int]:
        for t, off, length in self.extensions():
            if t == ext_type:
                return off, length
        raise LookupError(f"no extension {ext_type:#x}")

    def extensions_end(self) -> int:
        """Offset just past the end marker."""
        exts = self.extensions()
        if not exts:
            return self.header_length + 8
        _, off, length = exts[-1]
        return off + 8 + ((length + 7) & ~7) + 8

    def l1_entries(self, l1_offset: int, l1_size: int) -> list[tuple[int, int]]:
        """(file offset of the entry, entry) for every L1 entry."""
        return [(l1_offset + 8 * i, self.u64(l1_offset + 8 * i)) for i in range(l1_size)]

    def l2_entries(self, l1_offset: int | None = None,
                   l1_size: int | None = None) -> Iterator[tuple[int, int, int]]:
        """(file offset, entry, bitmap) of the L2 entries of a layer (active by default)."""
        l1_offset = self.l1_table_offset if l1_offset is None else l1_offset
        l1_size = self.l1_size if l1_size is None else l1_size
        for _, l1e in self.l1_entries(l1_offset, l1_size):
            l2 = l1e & 0x00FFFFFFFFFFFE00
            if not l2:
                continue
            for off in range(l2, l2 + self.cluster_size, self.l2_entry_size):
                bitmap = self.u64(off + 8) if self.extended_l2 else 0
                yield off, self.u64(off), bitmap

    def first_l2(self, pred: Callable[[int, int], bool]) -> tuple[int, int, int]:
        for off, entry, bitmap in self.l2_entries():
            if pred(entry, bitmap):
                return off, entry, bitmap
        raise LookupError("no such L2 entry in the active layer")

    def first_data_entry(self) -> tuple[int, int, int]:
        return self.first_l2(lambda e, b: bool(e & 0x00FFFFFFFFFFFE00) and not e & (1 << 62)
                             and not (e & 1 and not self.extended_l2)
                             and (not self.extended_l2 or bool(b & 0xFFFFFFFF)))

    def first_compressed(self) -> tuple[int, int]:
        """(host offset, compressed length) of the first compressed cluster."""
        _, entry, _ = self.first_l2(lambda e, b: bool(e & (1 << 62)))
        csize_shift = 62 - (self.cluster_bits - 8)
        host = entry & ((1 << csize_shift) - 1)
        sectors = ((entry >> csize_shift) & ((1 << (self.cluster_bits - 8)) - 1)) + 1
        return host, sectors * 512 - (host & 511)


# ---------------------------------------------------------------------------
# Fuzzing profiles
# ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Profile:
    """A clean fixture's bytes, where its metadata lies, and its companions."""

    data: bytes
    regions: tuple[tuple[int, int], ...]   # (start, length), possibly repeated as weight
    boundaries: tuple[int, ...]            # structure starts/ends, for truncations
    companions: tuple[Path, ...]


_PROFILES: dict[str, Profile] = {}


def _clip(regions: list[tuple[int, int]], size: int) -> tuple[tuple[int, int], ...]:
    out = []
    for start, length in regions:
        length = min(length, size - start)
        if start < size and length > 0:
            out.append((start, length))
    return tuple(out)


def profile(fixture_dir: Path, name: str, *, header_only: bool = False) -> Profile:
    key = f"{name}:{header_only}"
    if key in _PROFILES:
        return _PROFILES[key]
    entry = FIXTURES_BY_NAME[name]
    path = fixture_path(fixture_dir, name)
    data = path.read_bytes()
    lay = Layout(data)
    cs = lay.cluster_size
    header_end = 72 if lay.version == 2 else 112
    regions = [(0, header_end)] * 4 + [(0, 512), (header_end, lay.extensions_end() - header_end)]
    boundaries = {0, 4, 72, header_end, lay.extensions_end(), cs, len(data)}
    if lay.backing_file_offset:
        regions.append((lay.backing_file_offset, lay.backing_file_size))
    if lay.nb_snapshots:
        table_end = lay.snapshot_entries[-1] + 40
        regions += [(lay.snapshots_offset, table_end - lay.snapshots_offset)] * 3
        boundaries |= {lay.snapshots_offset, *lay.snapshot_entries[:8]}
    if not header_only:
        layers = [(lay.l1_table_offset, lay.l1_size)]
        for off in lay.snapshot_entries[:4]:
            layers.append((lay.u64(off), lay.u32(off + 8)))
        l2_tables: list[int] = []
        for l1_offset, l1_size in layers:
            regions.append((l1_offset, min(8 * l1_size, 4096)))
            boundaries |= {l1_offset, l1_offset + 8 * l1_size}
            for _, l1e in lay.l1_entries(l1_offset, min(l1_size, 512)):
                l2 = l1e & 0x00FFFFFFFFFFFE00
                if l2 and l2 not in l2_tables:
                    l2_tables.append(l2)
        used = lay.l2_entry_size * min(cs // lay.l2_entry_size, -(-lay.size // cs))
        for l2 in l2_tables[:8]:
            regions += [(l2, used)] * 2
            boundaries.add(l2)
        regions.append((lay.refcount_table_offset, 64))
        first_block = lay.u64(lay.refcount_table_offset) & ~0x1FF
        if first_block:
            regions.append((first_block, 256))
        with qcow2snap.open(path, check_locks=False) as image:
            seen = set()
            for extent in itertools.islice(image.extents(), 10_000):
                if extent.kind is ExtentKind.COMPRESSED and extent.host_offset not in seen:
                    seen.add(extent.host_offset)
                    if len(seen) <= 6:
                        regions.append((extent.host_offset, extent.compressed_length))
        regions.append((0, len(data)))
    companions = tuple(fixture_dir / c[:-3] for c in entry.get("companions", []))
    result = Profile(data, _clip(regions, len(data)),
                     tuple(sorted(b for b in boundaries if 0 <= b <= len(data))), companions)
    _PROFILES[key] = result
    return result


@contextlib.contextmanager
def damaged_image(data: bytes | bytearray, companions: tuple[Path, ...] = ()) -> Iterator[Path]:
    """A fresh directory holding the damaged image and links to its companions."""
    with tempfile.TemporaryDirectory(prefix="qcow2snap-damage-") as tmp:
        for companion in companions:
            place_companion(companion, Path(tmp) / companion.name)
        path = Path(tmp) / DAMAGED_NAME
        path.write_bytes(data)
        yield path


def mutations(prof: Profile) -> st.SearchStrategy[list[tuple[int, str, int]]]:
    """1-8 single-byte changes: (position, "set"/"xor", value)."""
    position = st.sampled_from(prof.regions).flatmap(
        lambda r: st.integers(r[0], r[0] + r[1] - 1))
    change = st.one_of(st.tuples(st.just("set"), st.sampled_from([0x00, 0xFF, 0x80, 0x01])),
                       st.tuples(st.just("set"), st.integers(0, 255)),
                       st.tuples(st.just("xor"), st.sampled_from([1 << b for b in range(8)])))
    return st.lists(st.tuples(position, change).map(lambda t: (t[0], *t[1])),
                    min_size=1, max_size=8)


def truncations(prof: Profile) -> st.SearchStrategy[int]:
    size = len(prof.data)
    near_boundary = st.sampled_from(prof.boundaries).flatmap(
        lambda b: st.integers(max(0, b - 16), min(size - 1, b + 16)))
    return st.one_of(st.integers(0, size - 1), near_boundary)


def apply_mutations(data: bytes, changes: list[tuple[int, str, int]]) -> bytearray:
    out = bytearray(data)
    for pos, kind, value in changes:
        out[pos] = value if kind == "set" else out[pos] ^ value
    return out


#: (fixture, mutation examples, truncation examples, header/snapshot table only)
FUZZ_PLAN = [
    ("v2", 60, 12, False),
    ("v3-basic", 60, 12, False),
    ("clusters-512", 60, 12, False),
    ("compressed-zlib", 60, 12, False),
    ("compressed-zstd", 60, 12, False),
    ("extended-l2", 60, 12, False),
    ("backing-chain", 50, 10, False),
    ("resized-shrink", 50, 10, False),
    ("savevm", 50, 10, False),
    ("refcount-1", 40, 8, False),
    ("zero-clusters", 40, 8, False),
    ("data-file", 40, 8, False),
    ("luks", 30, 6, False),
    ("many-snapshots", 15, 0, True),
]

_fuzz_settings = settings(deadline=None, derandomize=True, database=None, print_blob=False,
                          suppress_health_check=[HealthCheck.too_slow,
                                                 HealthCheck.data_too_large])


def _require(name: str) -> None:
    if name not in FIXTURES_BY_NAME:
        pytest.skip(f"fixture {name} not in the manifest")


@pytest.mark.parametrize("name,examples,header_only", [
    pytest.param(n, m, h, id=n) for n, m, _, h in FUZZ_PLAN])
def test_mutated_bytes_read_or_fail_cleanly(name: str, examples: int, header_only: bool,
                                            fixture_dir: Path) -> None:
    _require(name)
    prof = profile(fixture_dir, name, header_only=header_only)

    @settings(_fuzz_settings, max_examples=examples)
    @given(data=st.data())
    def check(data: st.DataObject) -> None:
        changes = data.draw(mutations(prof), label="changes")
        with damaged_image(apply_mutations(prof.data, changes), prof.companions) as path:
            exercise_checked(path, prof.companions, keep_going=True)

    check()


@pytest.mark.parametrize("name,examples", [
    pytest.param(n, t, id=n) for n, _, t, _ in FUZZ_PLAN if t])
def test_truncated_read_or_fail_cleanly(name: str, examples: int, fixture_dir: Path) -> None:
    _require(name)
    prof = profile(fixture_dir, name)

    @settings(_fuzz_settings, max_examples=examples)
    @given(length=truncations(prof))
    def check(length: int) -> None:
        with damaged_image(prof.data[:length], prof.companions) as path:
            exercise_checked(path, prof.companions, keep_going=True)

    check()


# ---------------------------------------------------------------------------
# Deterministic corpus of targeted corruptions
# ---------------------------------------------------------------------------

Patch = Callable[[bytearray, Layout], None]


@dataclass(frozen=True)
class Case:
    """One targeted corruption.

    ``error`` None means the image must read without error (a tolerated
    oddity, as in QEMU).  ``opens`` means ``qcow2snap.open`` and info succeed
    and the error comes from reading a layer.  ``qemu`` is a regex that
    qemu-img's stderr must match for the same file (``qemu_cmd`` "info" or
    "convert"; "convert-sn2" converts snapshot ID 2); ``qemu=None`` with an
    error means QEMU's behaviour is not compared.
    """

    id: str
    fixture: str
    patch: Patch
    error: type[Qcow2Error] | None
    match: str = ""
    opens: bool = False
    qemu: str | None = None
    qemu_cmd: str = "info"


def u8(off: int, value: int) -> Patch:
    return lambda b, lay: struct.pack_into(">B", b, off, value)


def u16(off: int, value: int) -> Patch:
    return lambda b, lay: struct.pack_into(">H", b, off, value)


def u32(off: int, value: int) -> Patch:
    return lambda b, lay: struct.pack_into(">I", b, off, value)


def u64(off: int, value: int) -> Patch:
    return lambda b, lay: struct.pack_into(">Q", b, off, value)


def both(*patches: Patch) -> Patch:
    def apply(b: bytearray, lay: Layout) -> None:
        for p in patches:
            p(b, lay)
    return apply


def with_layout(fn: Callable[[Layout], Patch]) -> Patch:
    """A patch whose offsets depend on the clean image's layout."""
    return lambda b, lay: fn(lay)(b, lay)


def snapshot_field(index: int, rel: int, fmt_: str, value: int) -> Patch:
    return lambda b, lay: struct.pack_into(fmt_, b, lay.snapshot_entries[index] + rel, value)


def l2_entry(pick: Callable[[Layout], tuple[int, int, int]],
             change: Callable[[int, int], tuple[int, int]]) -> Patch:
    """Rewrite (entry, bitmap) of the L2 entry ``pick`` finds in the active layer."""
    def apply(b: bytearray, lay: Layout) -> None:
        off, entry, bitmap = pick(lay)
        entry, bitmap = change(entry, bitmap)
        struct.pack_into(">Q", b, off, entry)
        if lay.extended_l2:
            struct.pack_into(">Q", b, off + 8, bitmap)
    return apply


def set_backing_name(name: bytes) -> Patch:
    def apply(b: bytearray, lay: Layout) -> None:
        off = lay.backing_file_offset
        assert off and off + len(name) <= lay.cluster_size
        b[off:off + max(len(name), lay.backing_file_size)] = name.ljust(lay.backing_file_size,
                                                                        b"\0")
        struct.pack_into(">I", b, 16, len(name))
    return apply


def rename_extension(ext_type: int, new_type: int | None = None,
                     new_data: bytes | None = None, *, resize: bool = False) -> Patch:
    """Change an extension's type and/or data (of the same padded length,
    unless ``resize``: then what follows is parsed from a new place)."""
    def apply(b: bytearray, lay: Layout) -> None:
        off, length = lay.extension(ext_type)
        if new_type is not None:
            struct.pack_into(">I", b, off, new_type)
        if new_data is not None:  # same padded length: the next extension stays put
            assert resize or (len(new_data) + 7) & ~7 == (length + 7) & ~7
            b[off + 8:off + 8 + len(new_data)] = new_data
            struct.pack_into(">I", b, off + 4, len(new_data))
    return apply


def name_unknown_feature(bit: int, name: bytes) -> Patch:
    """Turn the feature table's "lazy refcounts" entry into one naming the
    incompatible ``bit``, and set that bit."""
    def apply(b: bytearray, lay: Layout) -> None:
        off, length = lay.extension(0x6803F857)
        for entry in range(off + 8, off + 8 + length, 48):
            if b[entry:entry + 2] == b"\x01\x00":  # compatible bit 0
                b[entry:entry + 48] = bytes([0, bit]) + name.ljust(46, b"\0")
                break
        else:
            raise AssertionError("no lazy refcounts entry")
        struct.pack_into(">Q", b, 72, lay.incompatible_features | (1 << bit))
    return apply


def garble_compressed(b: bytearray, lay: Layout) -> None:
    host, length = lay.first_compressed()
    b[host:host + length] = bytes((0xA5 + 31 * i) & 0xFF for i in range(length))


def _past_eof(lay: Layout) -> int:
    """A cluster-aligned offset well past the end of the file."""
    return (len(lay.data) + 16 * lay.cluster_size) & ~(lay.cluster_size - 1)


def _offset_bits(e: int) -> int:
    return e & 0x00FFFFFFFFFFFE00


def _first_alloc_subcluster(bitmap: int) -> int:
    return (bitmap & -bitmap).bit_length() - 1


OFFSET_RE = "0x[0-9a-f]+"
#: QEMU prints indexes with %#x, which gives "0" for zero (Python's #x gives
#: "0x0", which this does not match): qcow2snap must print them the same way
QEMU_HEX = "(0x[1-9a-f][0-9a-f]*|0)"

CASES: list[Case] = [
    # --- header: magic, version, geometry ---------------------------------
    Case("bad-magic", "v3-basic", u32(0, 0x51464900), NotQcow2Error,
         "Image is not in qcow2 format"),
    Case("version-4", "v3-basic", u32(4, 4), UnsupportedImageError,
         "Unsupported qcow2 version 4", qemu="Unsupported qcow2 version 4"),
    # QEMU probes version 1 as the old qcow format and fails there
    Case("version-1", "v2", u32(4, 1), UnsupportedImageError, "Unsupported qcow2 version 1",
         qemu="Could not open"),
    Case("cluster-bits-8", "v3-basic", u32(20, 8), UnsupportedImageError,
         r"Unsupported cluster size: 2\^8", qemu=r"Unsupported cluster size: 2\^8"),
    Case("cluster-bits-22", "v3-basic", u32(20, 22), UnsupportedImageError,
         r"Unsupported cluster size: 2\^22", qemu=r"Unsupported cluster size: 2\^22"),
    Case("cluster-bits-huge", "v2", u32(20, 0xFFFFFFFF), UnsupportedImageError,
         r"Unsupported cluster size: 2\^4294967295", qemu="Unsupported cluster size"),
    Case("header-length-too-short", "v3-basic", u32(100, 100), CorruptImageError,
         "qcow2 header too short", qemu="qcow2 header too short"),
    Case("header-length-ffffffff", "v3-basic", u32(100, 0xFFFFFFFF), CorruptImageError,
         "qcow2 header exceeds cluster size", qemu="qcow2 header exceeds cluster size"),
    Case("header-length-7fffffff", "v3-basic", u32(100, 0x7FFFFFFF), CorruptImageError,
         "qcow2 header exceeds cluster size", qemu="qcow2 header exceeds cluster size"),
    Case("refcount-order-7", "v3-basic", u32(96, 7), CorruptImageError,
         "Reference count entry width too large; may not exceed 64 bits",
         qemu="Reference count entry width too large; may not exceed 64 bits"),
    Case("crypt-method-3", "v3-basic", u32(32, 3), UnsupportedImageError,
         "Unsupported encryption method: 3", qemu="Unsupported encryption method:? 3"),
    Case("extended-l2-small-clusters", "clusters-512", u64(72, 1 << 4), UnsupportedImageError,
         "Extended L2 entries are only supported with cluster sizes of at least 16384 bytes",
         qemu="Unsupported subcluster size: 16"),
    # --- feature bits -------------------------------------------------------
    Case("unknown-incompatible-bit", "v3-basic", u64(72, 1 << 21), UnsupportedImageError,
         r"Unsupported qcow2 feature\(s\): Unknown incompatible feature: 200000$",
         qemu=r"Unsupported qcow2 feature\(s\): Unknown incompatible feature: 200000"),
    Case("unknown-incompatible-bit-named", "v3-basic",
         name_unknown_feature(20, b"hostile feature"), UnsupportedImageError,
         r"Unsupported qcow2 feature\(s\): hostile feature",
         qemu=r"Unsupported qcow2 feature\(s\): hostile feature"),
    Case("compression-bit-without-type", "v3-basic", u64(72, 1 << 3), CorruptImageError,
         "Compression type incompatible feature bit must not be set",
         qemu="Compression type incompatible feature bit must not be set"),
    Case("zstd-without-compression-bit", "compressed-zstd", u64(72, 0), CorruptImageError,
         "Compression type incompatible feature bit must be set",
         qemu="Compression type incompatible feature bit must be set"),
    Case("compression-type-2", "compressed-zstd", u8(104, 2), UnsupportedImageError,
         "unknown compression type: 2", qemu="Unknown compression type 2|unknown compression"),
    Case("data-file-raw-without-data-file", "v3-basic", u64(88, 1 << 1), CorruptImageError,
         "data-file-raw requires a data file", qemu="data-file-raw requires a data file",
         qemu_cmd="convert"),
    Case("data-file-bit-without-name", "data-file",
         rename_extension(0x44415441, new_type=0x12345678), UnsupportedImageError,
         "'data-file' is required for this image", opens=True,
         qemu="'data-file' is required for this image", qemu_cmd="convert"),
    Case("unknown-compatible-and-autoclear-bits", "v3-basic",
         both(u64(80, 1 << 40), u64(88, 1 << 40)), None, qemu_cmd="convert"),
    # --- header extensions and backing file name -------------------------------
    Case("extension-too-large", "v3-basic",
         with_layout(lambda lay: u32(lay.extension(0x6803F857)[0] + 4, 0x10000)),
         CorruptImageError, "Header extension too large", qemu="Header extension too large"),
    Case("huge-extension-backing-offset-all-ones", "v3-basic",
         both(u64(8, 0xFFFFFFFFFFFFFFFF), u32(16, 0),
              with_layout(lambda lay: u32(lay.extension(0x6803F857)[0] + 4, 0xFFFFFF00))),
         CorruptImageError, "Invalid backing file offset", qemu="Invalid backing file offset"),
    Case("backing-offset-past-cluster", "v3-basic", both(u64(8, 0x10008), u32(16, 4)),
         CorruptImageError, "Invalid backing file offset", qemu="Invalid backing file offset"),
    Case("backing-name-too-long", "backing-chain", u32(16, 1024), CorruptImageError,
         "Backing file name too long", qemu="Backing file name too long"),
    Case("backing-name-past-cluster", "backing-chain",
         with_layout(lambda lay: u32(16, lay.cluster_size - lay.backing_file_offset + 1)),
         CorruptImageError, "Backing file name too long", qemu="Backing file name too long"),
    Case("backing-format-too-long", "v3-basic",
         rename_extension(0x6803F857, new_type=0xE2792ACA, new_data=b"qcow2-but-longer",
                          resize=True),
         CorruptImageError,
         "ext_backing_format: len=16 too large", qemu="ext_backing_format: len=16 too large"),
    Case("bitmaps-extension-bad-length", "v3-basic",
         rename_extension(0x6803F857, new_type=0x23852875), CorruptImageError,
         "bitmaps_ext: Invalid extension length", qemu="bitmaps_ext: Invalid extension length"),
    Case("crypto-extension-without-luks", "v3-basic",
         rename_extension(0x6803F857, new_type=0x0537BE77), CorruptImageError,
         "CRYPTO header extension only expected with LUKS encryption method",
         qemu="CRYPTO header extension only expected with LUKS encryption method"),
    Case("unknown-extension", "v3-basic", rename_extension(0x6803F857, new_type=0x12345678),
         None, qemu_cmd="convert"),
    Case("backing-file-missing", "backing-chain", set_backing_name(b"missing.qcow2"),
         UnsupportedImageError, r"backing file .*missing\.qcow2.* not found", opens=True,
         qemu="missing.qcow2.*No such file or directory", qemu_cmd="convert"),
    Case("backing-file-is-a-directory", "backing-chain", set_backing_name(b"."),
         UnsupportedImageError, r"cannot open backing file .*: Is a directory", opens=True,
         qemu="Is a directory|Could not open", qemu_cmd="convert"),
    Case("backing-name-empty", "backing-chain", set_backing_name(b""), None,
         qemu_cmd="convert"),
    Case("backing-format-unknown", "backing-chain",
         rename_extension(0xE2792ACA, new_data=b"vmdk0"), UnsupportedImageError,
         "backing file format 'vmdk0' is not supported", opens=True,
         qemu="Unknown driver 'vmdk0'", qemu_cmd="convert"),
    Case("backing-chain-loop", "backing-chain", set_backing_name(DAMAGED_NAME.encode()),
         CorruptImageError, "creates an infinite loop", opens=True,
         # qemu-img convert never ends on this image (QEMU 7.2: > 10 min, 2.5 GB)
         qemu="Backing file '.*' creates an infinite loop", qemu_cmd="info-chain"),
    # --- L1 table --------------------------------------------------------------
    Case("l1-size-huge", "v3-basic", u32(36, 0x7FFFFFFF), CorruptImageError,
         "Active L1 table too large", qemu="Active L1 table too large"),
    Case("l1-size-just-too-large", "v3-basic", u32(36, 0x2000000 // 8 + 1), CorruptImageError,
         "Active L1 table too large", qemu="Active L1 table too large"),
    Case("l1-offset-misaligned", "v3-basic",
         with_layout(lambda lay: u64(40, lay.l1_table_offset + 0x200)), CorruptImageError,
         "Active L1 table offset invalid", qemu="Active L1 table offset invalid"),
    Case("l1-offset-huge", "v3-basic", u64(40, 0xFFFFFFFFFFFF0000), CorruptImageError,
         "Active L1 table offset invalid", qemu="Active L1 table offset invalid"),
    Case("l1-offset-past-eof", "v3-basic", u64(40, 0x7FFFFFFF00000000), None,
         qemu_cmd="convert"),
    # The largest L1 QEMU accepts (32 MiB, 4M entries, a 2 PiB disk), all
    # unmapped: listing and reading must not walk it entry by entry.
    Case("l1-max-size-unmapped", "v3-basic",
         with_layout(lambda lay: both(u32(36, 0x2000000 // 8), u64(24, (0x2000000 // 8) << 29),
                                      u64(40, _past_eof(lay)))), None),
    Case("l1-size-zero", "v3-basic", u32(36, 0), CorruptImageError, "L1 table is too small",
         qemu="L1 table is too small"),
    Case("size-needs-bigger-l1", "v3-basic", u64(24, 1 << 40), CorruptImageError,
         "L1 table is too small", qemu="L1 table is too small"),
    Case("size-too-big", "v3-basic", u64(24, 1 << 63), CorruptImageError, "Image is too big",
         qemu="Image is too big|too large|Invalid argument"),
    Case("l1-entry-unaligned-l2", "v3-basic",
         with_layout(lambda lay: u64(lay.l1_table_offset,
                                     lay.u64(lay.l1_table_offset) + 0x1000)),
         CorruptImageError, rf"L2 table offset {OFFSET_RE} unaligned \(L1 index: 0\)",
         opens=True, qemu=rf"L2 table offset {OFFSET_RE} unaligned \(L1 index: 0\)",
         qemu_cmd="convert"),
    Case("l1-entry-past-eof", "v3-basic",
         with_layout(lambda lay: u64(lay.l1_table_offset, 1 << 50)), None,
         qemu_cmd="convert"),
    # --- refcount table ----------------------------------------------------------
    Case("refcount-table-clusters-zero", "v3-basic", u32(56, 0), CorruptImageError,
         "Image does not contain a reference count table",
         qemu="Image does not contain a reference count table"),
    Case("refcount-table-clusters-huge", "v3-basic", u32(56, 0xFFFFFF), CorruptImageError,
         "Reference count table too large", qemu="Reference count table too large"),
    Case("refcount-table-offset-misaligned", "v3-basic",
         with_layout(lambda lay: u64(48, lay.refcount_table_offset + 0x200)),
         CorruptImageError, "Reference count table offset invalid",
         qemu="Reference count table offset invalid"),
    Case("refcount-table-offset-huge", "v3-basic", u64(48, 0xFFFFFFFFFFFF0000),
         CorruptImageError, "Reference count table offset invalid",
         qemu="Reference count table offset invalid"),
    # --- snapshot table ------------------------------------------------------------
    Case("nb-snapshots-7fffffff", "v3-basic", u32(60, 0x7FFFFFFF), CorruptImageError,
         "Snapshot table too large", qemu="Snapshot table too large"),
    Case("nb-snapshots-ffffffff", "v3-basic", u32(60, 0xFFFFFFFF), CorruptImageError,
         "Snapshot table too large", qemu="Snapshot table too large"),
    Case("snapshots-offset-misaligned", "v3-basic",
         with_layout(lambda lay: u64(64, lay.snapshots_offset + 0x200)), CorruptImageError,
         "Snapshot table offset invalid", qemu="Snapshot table offset invalid"),
    Case("snapshots-offset-huge", "v3-basic", u64(64, 0xFFFFFFFFFFFF0000), CorruptImageError,
         "Snapshot table offset invalid", qemu="Snapshot table offset invalid"),
    Case("nb-snapshots-65536-past-eof", "v3-basic",
         with_layout(lambda lay: both(u32(60, 65536), u64(64, _past_eof(lay)))), None),
    Case("snapshot-extra-data-65536", "v3-basic", snapshot_field(1, 36, ">I", 65536),
         CorruptImageError, "Too much extra metadata in snapshot table entry 1",
         qemu="Too much extra metadata in snapshot table entry 1"),
    Case("snapshot-extra-data-1025", "v2", snapshot_field(2, 36, ">I", 1025),
         CorruptImageError, "Too much extra metadata in snapshot table entry 2",
         qemu="Too much extra metadata in snapshot table entry 2"),
    Case("snapshot-l1-offset-misaligned", "v3-basic",
         with_layout(lambda lay: snapshot_field(1, 0, ">Q", lay.u64(lay.snapshot_entries[1])
                                                + 0x200)),
         CorruptImageError, r"Snapshot L1 table offset invalid: snapshot 2 \(second\)",
         opens=True, qemu="Snapshot L1 table offset invalid", qemu_cmd="convert-sn2"),
    Case("snapshot-l1-size-huge", "v3-basic", snapshot_field(1, 8, ">I", 0x10000000),
         CorruptImageError, r"Snapshot L1 table too large: snapshot 2 \(second\)", opens=True,
         qemu="Snapshot L1 table too large", qemu_cmd="convert-sn2"),
    Case("snapshot-l1-entry-unaligned-l2", "v3-basic",
         with_layout(lambda lay: u64(lay.u64(lay.snapshot_entries[1]),
                                     lay.u64(lay.u64(lay.snapshot_entries[1])) | 0x400)),
         CorruptImageError, rf"L2 table offset {OFFSET_RE} unaligned .*snapshot 2 \(second\)",
         opens=True, qemu="L2 table offset 0x[0-9a-f]+ unaligned", qemu_cmd="convert-sn2"),
    # A snapshot's disk_size is not bounded by its L1 table: walking the
    # unmapped petabytes must take one step, not one per L1 entry.  Up to
    # the largest disk QEMU's L1 limit allows (32 MiB of L1: 2 PiB with
    # 64 KiB clusters, 128 GiB with 512-byte ones) that is a valid image ...
    Case("snapshot-disk-size-huge", "v3-basic", snapshot_field(1, 48, ">Q", 1 << 51), None),
    Case("snapshot-disk-size-huge-small-clusters", "clusters-512",
         snapshot_field(0, 48, ">Q", 1 << 37), None),
    # ... beyond it, damage: refused rather than extracted as petabytes of holes
    Case("snapshot-disk-size-too-large", "v3-basic",
         snapshot_field(1, 48, ">Q", (1 << 51) + 1), CorruptImageError,
         r"Snapshot disk size too large: snapshot 2 \(second\) claims 2251799813685249 bytes",
         opens=True),
    Case("snapshot-disk-size-too-large-small-clusters", "clusters-512",
         snapshot_field(0, 48, ">Q", (1 << 50) + 512), CorruptImageError,
         r"Snapshot disk size too large: snapshot 1 ", opens=True),
    Case("snapshot-id-not-utf8", "v3-basic", snapshot_field(0, 40 + 24, ">H", 0xFFFE),
         None, qemu_cmd="info"),
    Case("snapshot-table-past-eof", "v3-basic", with_layout(lambda lay: u64(64, _past_eof(lay))),
         None, qemu_cmd="info"),
    # --- L2 entries ------------------------------------------------------------------
    Case("l2-data-offset-unaligned", "v3-basic",
         l2_entry(Layout.first_data_entry, lambda e, b: (e + 0x1000, b)), CorruptImageError,
         rf"Cluster allocation offset {OFFSET_RE} unaligned \(L2 offset: {OFFSET_RE}, "
         rf"L2 index: {QEMU_HEX}\)", opens=True,
         qemu=rf"Cluster allocation offset {OFFSET_RE} unaligned \(L2 offset: {OFFSET_RE}, "
              rf"L2 index: {QEMU_HEX}\)", qemu_cmd="convert"),
    Case("l2-reserved-bits", "v3-basic",
         l2_entry(Layout.first_data_entry, lambda e, b: (e | 0x3F000000000001FE, b)), None,
         qemu_cmd="convert"),
    Case("l2-data-past-eof", "v3-basic",
         l2_entry(Layout.first_data_entry, lambda e, b: (1 << 50, b)), None,
         qemu_cmd="convert"),
    Case("zero-flag-in-v2", "v2",
         l2_entry(Layout.first_data_entry, lambda e, b: (e | 1, b)), CorruptImageError,
         rf"Zero cluster entry found in pre-v3 image \(L2 offset: {OFFSET_RE}, "
         rf"L2 index: {QEMU_HEX}\)", opens=True,
         qemu="Zero cluster entry found in pre-v3 image", qemu_cmd="convert"),
    Case("extended-l2-alloc-and-zero", "extended-l2",
         l2_entry(Layout.first_data_entry,
                  lambda e, b: (e, b | (1 << (32 + _first_alloc_subcluster(b))))),
         CorruptImageError, rf"Invalid cluster entry found +\(L2 offset: {OFFSET_RE}, "
         rf"L2 index: {QEMU_HEX}\)", opens=True, qemu="Invalid cluster entry found",
         qemu_cmd="convert"),
    Case("extended-l2-alloc-without-offset", "extended-l2",
         l2_entry(Layout.first_data_entry, lambda e, b: (0, b)), CorruptImageError,
         "Invalid cluster entry found", opens=True, qemu="Invalid cluster entry found",
         qemu_cmd="convert"),
    # QEMU ignores the bitmap of a compressed cluster (QCOW2_SUBCLUSTER_COMPRESSED)
    # and decompresses what the entry points at: here plain data, so both fail
    # there (the iotest-271 case, real compressed data, reads: test_fidelity.py)
    Case("extended-l2-compressed-with-bitmap", "extended-l2",
         l2_entry(Layout.first_data_entry, lambda e, b: ((1 << 62) | _offset_bits(e), 1)),
         CorruptImageError,
         rf"compressed cluster at host offset {OFFSET_RE} (does not decompress|decompresses "
         r"to \d+ bytes)", opens=True, qemu="Input/output error", qemu_cmd="convert"),
    Case("compressed-zlib-garbage", "compressed-zlib", garble_compressed, CorruptImageError,
         rf"compressed cluster at host offset {OFFSET_RE} (does not decompress|decompresses "
         r"to \d+ bytes)", opens=True, qemu="Input/output error", qemu_cmd="convert"),
    Case("compressed-zstd-garbage", "compressed-zstd", garble_compressed, CorruptImageError,
         rf"compressed cluster at host offset {OFFSET_RE} (does not decompress|decompresses "
         r"to \d+ bytes)", opens=True, qemu="Input/output error", qemu_cmd="convert"),
    Case("compressed-in-data-file-image", "data-file",
         l2_entry(Layout.first_data_entry, lambda e, b: (e | (1 << 62), b)),
         CorruptImageError, "Compressed cluster entry found in image with external data file",
         opens=True, qemu="Compressed cluster entry found in image with external data file",
         qemu_cmd="convert"),
    Case("data-file-host-offset-mismatch", "data-file",
         l2_entry(Layout.first_data_entry, lambda e, b: (e + 0x10000, b)), CorruptImageError,
         "External data file host cluster offset 0x[0-9a-f]+ does not match guest cluster",
         opens=True, qemu="External data file host cluster offset", qemu_cmd="convert"),
    Case("data-file-missing", "data-file",
         rename_extension(0x44415441, new_data=b"missing.data"), UnsupportedImageError,
         r"cannot open data file .*missing\.data.*: No such file or directory", opens=True,
         qemu="No such file or directory", qemu_cmd="convert"),
    # --- truncations -----------------------------------------------------------------
    Case("truncated-empty", "v3-basic", lambda b, lay: b.clear(), NotQcow2Error,
         "Image is not in qcow2 format"),
    Case("truncated-in-header", "v3-basic", lambda b, lay: b.__delitem__(slice(64, None)),
         NotQcow2Error, "Image is not in qcow2 format"),
    Case("truncated-to-header-cluster", "v3-basic",
         lambda b, lay: b.__delitem__(slice(lay.cluster_size, None)), None, qemu_cmd="convert"),
]

CASES_BY_ID = {c.id: c for c in CASES}
assert len(CASES_BY_ID) == len(CASES), "duplicate case id"


def build_case(case: Case, fixture_dir: Path) -> tuple[bytearray, tuple[Path, ...]]:
    entry = FIXTURES_BY_NAME[case.fixture]
    data = bytearray(fixture_path(fixture_dir, case.fixture).read_bytes())
    case.patch(data, Layout(bytes(data)))
    companions = tuple(fixture_dir / c[:-3] for c in entry.get("companions", []))
    if case.id == "data-file-missing":
        companions = ()
    return data, companions


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in CASES])
def test_targeted_corruption(case: Case, fixture_dir: Path) -> None:
    _require(case.fixture)
    data, companions = build_case(case, fixture_dir)
    with damaged_image(data, companions) as path:
        if case.opens:
            with unchanged(path), qcow2snap.open(path) as image:
                describe.image_info_json(inspection.image_facts(image))
        if case.error is None:
            assert exercise_checked(path, companions) is None
            return
        with (pytest.raises(case.error, match=case.match) as info,
              unchanged(path, *companions), time_limit(TIME_LIMIT, case.id)):
            exercise(path)
        assert "\n" not in str(info.value)
        if isinstance(info.value, CorruptImageError):
            assert info.value.structure, "a CorruptImageError must name the structure"


QEMU_TIMEOUT = 60


def _qemu_command(qemu_img: str, case: Case, path: Path) -> list[str]:
    out = str(path.with_suffix(".raw"))
    if case.qemu_cmd == "info":
        return [qemu_img, "info", path.name]
    if case.qemu_cmd == "info-chain":
        return [qemu_img, "info", "--backing-chain", path.name]
    if case.qemu_cmd == "convert":
        return [qemu_img, "convert", "-O", "raw", path.name, out]
    if case.qemu_cmd == "convert-sn2":
        return [qemu_img, "convert", "-l", "snapshot.id=2", "-O", "raw", path.name, out]
    raise AssertionError(case.qemu_cmd)


@pytest.mark.qemu
@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in CASES
                                  if c.qemu is not None or c.error is None])
def test_qemu_agrees(case: Case, fixture_dir: Path, qemu_img: str) -> None:
    """qemu-img refuses the images we refuse (with the wording we copy), and
    reads the ones we read."""
    _require(case.fixture)
    data, companions = build_case(case, fixture_dir)
    with damaged_image(data, companions) as path:
        try:
            result = subprocess.run(_qemu_command(qemu_img, case, path), cwd=path.parent,
                                    capture_output=True, encoding="utf-8", errors="replace",
                                    timeout=QEMU_TIMEOUT, check=False)
        except subprocess.TimeoutExpired:
            pytest.fail(f"qemu-img did not finish within {QEMU_TIMEOUT} s")
        if case.error is None:
            assert result.returncode == 0, result.stderr
            if case.qemu_cmd == "convert":  # and both read the same guest bytes
                with qcow2snap.open(path) as image, image.open_disk() as disk:
                    ours = hashlib.sha256(disk.readall()).hexdigest()
                theirs = hashlib.sha256(path.with_suffix(".raw").read_bytes()).hexdigest()
                assert ours == theirs
        else:
            assert result.returncode != 0, f"qemu-img accepted it: {result.stdout}"
            assert re.search(case.qemu or ".", result.stderr), result.stderr


@pytest.mark.parametrize("fixture,patch,fifo", [
    pytest.param("backing-chain", set_backing_name(b"fifo"), "fifo", id="backing-qcow2"),
    pytest.param("backing-chain", both(set_backing_name(b"fifo"),
                                       rename_extension(0xE2792ACA, new_type=0x12345678)),
                 "fifo", id="backing-probed"),
    pytest.param("data-file", rename_extension(0x44415441, new_data=b"data-file.fifo"),
                 "data-file.fifo", id="data-file"),
])
def test_companion_that_would_block(fixture: str, patch: Patch, fifo: str,
                                    fixture_dir: Path) -> None:
    """A backing or data file name pointing at a FIFO: opening it would wait
    for a writer forever; it must be refused instead."""
    _require(fixture)
    data = bytearray(fixture_path(fixture_dir, fixture).read_bytes())
    patch(data, Layout(bytes(data)))
    with damaged_image(data) as path:
        os.mkfifo(path.parent / fifo)
        with (pytest.raises(UnsupportedImageError, match="not a regular file or block device"),
              unchanged(path), time_limit(5, "fifo")):
            exercise(path)


# ---------------------------------------------------------------------------
# CLI: one clean error line
# ---------------------------------------------------------------------------

CLI_CASES = [c for c in CASES if c.error is not None and not c.opens]


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in CLI_CASES])
@pytest.mark.parametrize("command", [["info", "--json"], ["list"]], ids=["info", "list"])
def test_cli_reports_one_error_line(case: Case, command: list[str], fixture_dir: Path) -> None:
    _require(case.fixture)
    assert case.error is not None
    data, companions = build_case(case, fixture_dir)
    with damaged_image(data, companions) as path, unchanged(path):
        result = invoke(*command, path)
    assert result.exit_code == case.error.exit_code != 0
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("qcow2snap: error: ")
    assert re.search(case.match, lines[0])
    assert "Traceback" not in result.output


def _check_cli_result(result: Any) -> None:
    """Success with JSON on stdout, or exactly one error line on stderr."""
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    lines = result.stderr.splitlines()
    if result.exit_code == 0:
        assert not [line for line in lines if "error" in line], result.stderr
        json.loads(result.stdout)
    else:
        assert len(lines) == 1, result.stderr
        assert lines[0].startswith("qcow2snap: error: ")


@pytest.mark.parametrize("name", ["v3-basic", "compressed-zlib", "backing-chain"])
def test_cli_on_mutated_images(name: str, fixture_dir: Path) -> None:
    """Damaged images through the CLI: a JSON answer or one error line."""
    _require(name)
    prof = profile(fixture_dir, name)

    @settings(_fuzz_settings, max_examples=25)
    @given(data=st.data())
    def check(data: st.DataObject) -> None:
        changes = data.draw(mutations(prof), label="changes")
        with (damaged_image(apply_mutations(prof.data, changes), prof.companions) as path,
              unchanged(path), time_limit(TIME_LIMIT, "cli")):
            for command in (["info", "--json"], ["list", "--json"]):
                _check_cli_result(invoke(*command, path))

    check()


# ---------------------------------------------------------------------------
# Sanity: the harness itself
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", [n for n, *_ in FUZZ_PLAN])
def test_clean_fixture_exercises_without_error(name: str, fixture_dir: Path) -> None:
    """Undamaged, every fuzzed fixture reads completely (so a damaged one
    that errors does so because of the damage)."""
    _require(name)
    prof = profile(fixture_dir, name)
    with damaged_image(prof.data, prof.companions) as path:
        assert exercise_checked(path, prof.companions) is None


def test_time_limit_catches_a_hang() -> None:
    with pytest.raises(AssertionError, match="no result within"), time_limit(0.2, "sleep"):
        while True:  # even code that swallows every Exception is interrupted
            with contextlib.suppress(Exception):
                signal.pause()


def test_unchanged_catches_a_write(tmp_path: Path) -> None:
    path = tmp_path / "x"
    path.write_bytes(b"abc")
    with pytest.raises(AssertionError, match="was modified"), unchanged(path):
        path.write_bytes(b"abd")
