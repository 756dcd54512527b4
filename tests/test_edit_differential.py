"""Differential tests of editing: qcow2snap against QEMU itself.

Two copies of one fixture walk the same seeded random sequence of guest
writes (``qemu-io`` on both) and snapshot operations: copy A gets them from
``qemu-img snapshot -c/-d/-a``, copy B from :class:`EditableImage`.  After
every step:

* ``qemu-img check`` on B finds nothing (no leak, no corruption, no error);
* the snapshot lists agree (IDs, names, VM-state sizes, clocks, icount,
  dates kept; disk sizes via qcow2snap);
* the active disks and every snapshot's content agree, as QEMU reads them
  (``qemu-img compare``; snapshots through ``convert -l snapshot.id=``, or
  by reverting a scratch copy with QEMU when a snapshot's disk size is not
  the current one).

Where qemu-img refuses an operation (refcount overflow with narrow
refcounts, ...), qcow2snap must refuse too, with a Qcow2Error, leaving B
byte-identical.  Renames exist only in qcow2snap: they are applied to B
alone and the tests track both name lists.

A second test starts a real ``qemu-system-x86_64`` on a qcow2snap-edited
savevm image and checks ``loadvm`` of the surviving VM snapshots.

Reproduce a failure with the fixture name, the seed and the step log in the
assertion message (also written to ``steps.log`` in the test's tmp dir).
"""

from __future__ import annotations

import json
import random
import re
import shutil
import subprocess
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from conftest import FIXTURES_BY_NAME, fixtures_with
from helpers import QemuCheck, assert_qemu_clean, require_tool

import qcow2snap
from qcow2snap import Qcow2Error
from qcow2snap.ops.transaction import CommitResult, RefcountOverflowError

pytestmark = pytest.mark.qemu


# --------------------------------------------------------------------------
# Plan: fixture -> (seeds, steps per seed).  qemu-img calls dominate the run
# time (about 10 ms each, ~10-20 per step, run 4 at a time); the sizes keep
# this file under three minutes on two cores.

PLAN: dict[str, tuple[tuple[int, ...], int]] = {
    "v2": ((1, 2, 3), 22),
    "v3-basic": ((1, 2, 3, 4), 24),
    "clusters-512": ((1, 2), 24),
    "clusters-2m": ((1,), 16),
    "refcount-1": ((1, 2), 14),
    "refcount-2": ((1, 2, 3), 18),
    "refcount-4": ((1, 2), 20),
    "refcount-8": ((1,), 18),
    "refcount-32": ((1,), 16),
    "refcount-64": ((1,), 16),
    "compressed-zlib": ((1, 2), 22),
    "compressed-zstd": ((1, 2), 20),
    "extended-l2": ((1, 2, 3), 22),
    "zero-clusters": ((1, 2), 22),
    "backing-chain": ((1, 2), 20),
    "raw-backing": ((1,), 18),
    "resized-grow": ((1, 2, 3), 20),
    "resized-shrink": ((1, 2, 3), 20),
    "empty-snapshot": ((1,), 18),
    "savevm": ((1, 2), 16),
    "lazy-refcounts": ((1,), 16),
    "ambiguous": ((1, 2), 22),
    "many-snapshots": ((1,), 6),
    "savevm-seabios": ((1,), 10),
    "savevm-suspended": ((1,), 10),
    "luks": ((1,), 14),
    "aes": ((1,), 10),
    "linux-guest": ((1,), 6),
}


class Divergence(AssertionError):
    """A and B differ in state: the run stops here."""


class RefusalDivergence(AssertionError):
    """qemu-img and qcow2snap disagree on whether an operation is possible
    (both copies were put back to the state before it, and the run went on)."""


#: Known disagreements on refusals, each pinned by a focused xfail(strict)
#: test below: (fixture, operation prefix, qemu-img error text).  The
#: random runs note them in the step log and go on from the state before.
KNOWN_REFUSAL_DIVERGENCES: list[tuple[str, str, str]] = []


def _case(name: str, seed: int, steps: int) -> Any:
    return pytest.param(name, seed, steps, id=f"{name}-seed{seed}")


CASES = [_case(name, seed, steps)
         for name, (seeds, steps) in PLAN.items() if name in FIXTURES_BY_NAME
         for seed in seeds]

#: keep snapshot lists short so that comparing every snapshot stays cheap
MAX_SNAPSHOTS = 7
#: for images with more snapshots than this, a step compares a sample
FULL_COMPARE_LIMIT = 12

_TIMING_LINE = re.compile(r"ops; .* sec")


@dataclass
class Tracked:
    """One snapshot as both copies should have it."""

    id: str
    a_name: str
    b_name: str
    uid: int                       # unique per snapshot instance (cache key)
    b_date: tuple[int, int] | None = None


@dataclass
class Pair:
    """Copy A (edited by qemu-img) and copy B (edited by qcow2snap) of one fixture."""

    fixture: str
    seed: int
    workdir: Path
    rnd: random.Random
    snaps: list[Tracked] = field(default_factory=list)
    log: list[str] = field(default_factory=list)
    soft: list[str] = field(default_factory=list)
    size: int = 0
    cluster_size: int = 0
    step: int = -1
    _uid: int = 0
    _names: int = 0
    _a_cache: dict[tuple[Any, ...], Path] = field(default_factory=dict)
    _initial_uids: int = 0
    _reported: set[Any] = field(default_factory=set)
    hot: list[int] = field(default_factory=list)
    tags: tuple[str, ...] = ()
    secret: str | None = None      # LUKS: QEMU opens the image with --image-opts
    pool: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(4))

    A = "A.qcow2"
    B = "B.qcow2"

    # ---------------------------------------------------------------- util

    def path(self, name: str) -> Path:
        return self.workdir / name

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(list(args), cwd=self.workdir, capture_output=True, text=True,
                              timeout=120, check=False)

    def ok(self, *args: str) -> subprocess.CompletedProcess[str]:
        proc = self.run(*args)
        if proc.returncode != 0:
            self.fail(f"{' '.join(args)} failed (rc {proc.returncode}): "
                      f"{proc.stdout}{proc.stderr}")
        return proc

    def where(self) -> str:
        tail = "\n  ".join(self.log[-12:])
        return (f"[fixture {self.fixture}, seed {self.seed}, step {self.step}] "
                f"(full log: {self.workdir / 'steps.log'})\n  last steps:\n  {tail}")

    def fail(self, message: str) -> None:
        self.flush_log()
        raise Divergence(f"{message}\n{self.where()}")

    def note(self, entry: str) -> None:
        self.log.append(f"step {self.step}: {entry}")

    def flush_log(self) -> None:
        (self.workdir / "steps.log").write_text("\n".join(self.log) + "\n")

    def opts(self, image: str) -> tuple[list[str], str]:
        """(options, image argument) for QEMU tools opening ``image``."""
        if self.secret is None:
            return [], image
        return (["--object", f"secret,id=sec0,data={self.secret}", "--image-opts"],
                f"driver=qcow2,file.filename={image},encrypt.key-secret=sec0")

    def qimg(self, sub: str, *args: str, image: str) -> list[str]:
        """``qemu-img SUB [options] ARGS IMAGE``."""
        pre, arg = self.opts(image)
        return ["qemu-img", sub, *pre, *args, arg]

    def info(self, image: str) -> dict[str, Any]:
        return json.loads(self.ok(*self.qimg("info", "--output=json", image=image)).stdout)

    def new_uid(self) -> int:
        self._uid += 1
        return self._uid

    def fresh_name(self, prefix: str = "n") -> str:
        self._names += 1
        return f"{prefix}{self._names}"

    # ------------------------------------------------------------- set-up

    def setup(self, source: Path) -> None:
        for image in (self.A, self.B):
            shutil.copyfile(source, self.path(image))
        info = self.info(self.A)
        self.size = info["virtual-size"]
        self.cluster_size = info["cluster-size"]
        for s in info.get("snapshots", []):
            self.snaps.append(Tracked(s["id"], s["name"], s["name"], self.new_uid(),
                                      (s["date-sec"], s["date-nsec"])))
        self._initial_uids = self._uid
        self.log.append(f"fixture {self.fixture} seed {self.seed}: A and B are copies; "
                        f"size {self.size}, snapshots {[(t.id, t.a_name) for t in self.snaps]}")

    # -------------------------------------------------------- guest writes

    def extent(self, whole_clusters: bool = False) -> tuple[int, int]:
        rnd, size, cs = self.rnd, self.size, self.cluster_size
        clusters = max(1, size // cs)
        if self.hot and rnd.random() < 0.4:
            base = rnd.choice(self.hot)
            base = min(base - base % cs + cs * rnd.randint(-1, 1), (clusters - 1) * cs)
            base = max(base, 0)
        else:
            base = rnd.randrange(clusters) * cs
        mode = "cluster" if whole_clusters else rnd.choice(["cluster", "sector", "byte"])
        if mode == "cluster":
            off, length = base, cs * (1 if whole_clusters else rnd.randint(1, 3))
        elif mode == "sector":
            off = base + rnd.randrange(max(1, cs // 512)) * 512
            length = 512 * rnd.randint(1, max(1, min(3 * cs, 1 << 20) // 512))
        else:
            off = base + rnd.randrange(cs)
            length = rnd.randint(1, 2 * cs + 777)
        off = min(off, size - 1)
        length = max(1, min(length, size - off))
        self.hot.append(off)
        return off, length

    def guest_io(self, kind: str) -> None:
        commands = []
        for _ in range(self.rnd.randint(1, 3)):
            if kind == "write":
                off, length = self.extent()
                commands.append(f"write -P {self.rnd.randrange(1, 256):#x} {off:#x} {length:#x}")
            elif kind == "zero":
                off, length = self.extent()
                commands.append(f"write -z {off:#x} {length:#x}")
            elif kind == "zero-unmap":
                off, length = self.extent()
                commands.append(f"write -z -u {off:#x} {length:#x}")
            elif kind == "discard":
                off, length = self.extent()
                commands.append(f"discard {off:#x} {length:#x}")
            elif kind == "compressed":
                off, length = self.extent(whole_clusters=True)
                if length != self.cluster_size:
                    continue
                commands.append(f"write -c -P {self.rnd.randrange(1, 256):#x} {off:#x} "
                                f"{length:#x}")
        if not commands:
            return
        args = [a for c in commands for a in ("-c", c)]
        self.note("guest (both): qemu-io " + " ".join(repr(c) for c in commands))
        results = []
        procs = [self.pool.submit(self.run, "qemu-io", *(self.opts(image)[0] or ["-f", "qcow2"]),
                                  *args, self.opts(image)[1])
                 for image in (self.A, self.B)]
        for image, future in zip((self.A, self.B), procs, strict=True):
            proc = future.result()
            text = "\n".join(line for line in (proc.stdout + proc.stderr).splitlines()
                             if not _TIMING_LINE.search(line))
            results.append((proc.returncode, text.replace(image, "IMG")))
        if results[0] != results[1]:
            self.fail(f"qemu-io behaves differently on A and B:\nA: {results[0]}\n"
                      f"B: {results[1]}")

    def resize(self) -> None:
        new = self.rnd.randrange(4, 97) << 20
        if new == self.size:
            return
        args = ["-q"] + (["--shrink"] if new < self.size else [])
        self.note(f"guest (both): qemu-img resize {' '.join(args)} IMG {new}")
        a, b = (self.run("qemu-img", "resize", *self.opts(image)[0], *args, self.opts(image)[1],
                         str(new)) for image in (self.A, self.B))
        if (a.returncode == 0) != (b.returncode == 0):
            self.fail(f"qemu-img resize differs: A rc {a.returncode} {a.stderr!r}, "
                      f"B rc {b.returncode} {b.stderr!r}")
        if a.returncode == 0:
            self.size = new

    # --------------------------------------------------- snapshot operations

    def _snapshot_op(self, what: str, a_cmds: list[list[str]], b_op: Any) -> Any:
        """Run one snapshot operation on both; handle refusals.  ``b_op(image,
        dry_run)`` runs it on B.  Returns its value, or None when refused.

        Now and then B first gets a dry run, which must write nothing and
        predict exactly what the real commit then reports."""
        a_before = self.path(self.A).read_bytes()
        b_before = self.path(self.B).read_bytes()
        a_err = None
        for cmd in a_cmds:
            proc = self.run(*cmd)
            if proc.returncode != 0:
                a_err = f"{' '.join(cmd)}: {proc.stderr.strip()}"
                break
        b_err: BaseException | None = None
        b_value = None
        dry = self.rnd.random() < 0.3
        predicted: CommitResult | None = None
        try:
            with qcow2snap.open(self.path(self.B), "r+") as image:
                if dry:
                    predicted = _commit_of(b_op(image, True))
                    if self.path(self.B).read_bytes() != b_before:
                        self.fail(f"{what}: dry run changed B")
                    if not predicted.dry_run:
                        self.fail(f"{what}: the dry run's result is not marked dry_run")
                b_value = b_op(image, False)
        except Qcow2Error as exc:
            b_err = exc
        except Divergence:
            raise
        except Exception as exc:
            b_err = exc
            self.soft_divergence(f"{what}: qcow2snap raised {type(exc).__name__} (not a "
                                 f"Qcow2Error): {exc}")
        b_changed = self.path(self.B).read_bytes() != b_before
        if a_err is None and b_err is None:
            self.check_header_kept(what, b_before)
            result = _commit_of(b_value)
            size = self.path(self.B).stat().st_size
            if result.file_size_after != size:
                self.fail(f"{what}: CommitResult.file_size_after {result.file_size_after}, "
                          f"file is {size} bytes")
            if predicted is not None and _comparable(predicted) != _comparable(result):
                self.fail(f"{what}: the dry run predicted {predicted}, the commit did {result}")
            return b_value
        if a_err is not None and b_err is not None:
            self.note(f"  both refused: qemu-img: {a_err} | qcow2snap: "
                      f"{type(b_err).__name__}: {b_err}")
            if b_changed:
                self.soft_divergence(f"{what}: qcow2snap refused ({b_err}) but changed B")
        elif a_err is not None:
            message = f"{what}: qemu-img refused ({a_err}) but qcow2snap did it"
            if any(self.fixture == f and what.startswith(op) and text in a_err
                   for f, op, text in KNOWN_REFUSAL_DIVERGENCES):
                self.note("KNOWN DIVERGENCE " + message)
            else:
                self.soft_divergence(message)
        else:
            self.soft_divergence(f"{what}: qemu-img did it but qcow2snap refused: "
                                 f"{type(b_err).__name__}: {b_err}")
        # go on from the state before the operation
        self.path(self.A).write_bytes(a_before)
        self.path(self.B).write_bytes(b_before)
        return None

    #: header bytes an edit may change: size, l1_size, l1_table_offset, refcount
    #: table offset/clusters, nb_snapshots, snapshots_offset, autoclear bits
    MUTABLE_HEADER = ((24, 32), (36, 72), (88, 96))

    def check_header_kept(self, what: str, before: bytes) -> None:
        """Everything else in cluster 0 (other header fields, extensions,
        the backing file name) stays byte for byte."""
        span = min(self.cluster_size, 1 << 16, len(before))
        with open(self.path(self.B), "rb") as f:
            after = f.read(span)
        masked = [bytearray(before[:span]), bytearray(after)]
        for lo, hi in self.MUTABLE_HEADER:
            for data in masked:
                data[lo:hi] = bytes(hi - lo)
        if masked[0] == masked[1]:
            return
        for i in range(span):
            if before[i] != after[i] and not any(lo <= i < hi for lo, hi in self.MUTABLE_HEADER):
                self.fail(f"{what}: cluster 0 byte {i} changed {before[i]:#x} -> {after[i]:#x}")

    def soft_divergence(self, message: str) -> None:
        entry = f"[{self.fixture} seed {self.seed} step {self.step}] {message}"
        self.note("DIVERGENCE " + message)
        self.soft.append(entry)

    def pick(self) -> int:
        return self.rnd.randrange(len(self.snaps))

    def _first_a(self, index: int) -> int:
        name = self.snaps[index].a_name
        return next(i for i, t in enumerate(self.snaps) if t.a_name == name)

    def _b_ref(self, image: Any, t: Tracked, prefer: str) -> Any:
        """A reference qcow2snap resolves to ``t``: a plain string when it is
        unambiguous (exercises find_snapshot), else the Snapshot object."""
        if prefer == "name":
            matches = [s for s in image.snapshots if t.b_name in (s.id, s.name)]
            if len(matches) == 1 and matches[0].id == t.id:
                return t.b_name
        matches = [s for s in image.snapshots if t.id in (s.id, s.name)]
        if len(matches) == 1:
            return t.id
        return image.find_snapshot(t.id, by="id")

    def create(self) -> None:
        b_names = {t.b_name for t in self.snaps}
        roll = self.rnd.random()
        if roll < 0.15 and self.snaps:
            name = str(int(max(self.snaps, key=lambda t: int(t.id) if t.id.isdigit()
                                else 0).id) + self.rnd.randint(0, 2))  # looks like an ID
        elif roll < 0.22:
            name = "sn\u00e4p-" + self.fresh_name()  # non-ASCII
        else:
            name = self.fresh_name()
        if name in b_names or name in {t.a_name for t in self.snaps}:
            name = self.fresh_name()
        self.note(f"create: A: qemu-img snapshot -c {name!r}; B: create_snapshot({name!r})")
        result = self._snapshot_op(
            f"create {name!r}", [self.qimg("snapshot", "-c", name, image=self.A)],
            lambda im, dry: im.create_snapshot(name, dry_run=dry))
        if result is None:
            return
        new_id, _ = result
        a_list = self.info(self.A).get("snapshots", [])
        if a_list[-1]["name"] != name or a_list[-1]["id"] != new_id:
            self.fail(f"create: qemu-img made ID {a_list[-1]['id']!r}, qcow2snap returned "
                      f"{new_id!r}")
        self.snaps.append(Tracked(new_id, name, name, self.new_uid()))

    def overwrite(self) -> None:
        """HMP savevm semantics: delete the first snapshot of the name, create."""
        candidates = [i for i, t in enumerate(self.snaps)
                      if self._first_a(i) == i
                      and next(j for j, u in enumerate(self.snaps) if u.b_name == t.b_name) == i]
        if not candidates:
            return
        index = self.rnd.choice(candidates)
        t = self.snaps[index]
        self.note(f"overwrite: A: qemu-img snapshot -d {t.a_name!r} && -c {t.a_name!r}; "
                  f"B: create_snapshot({t.b_name!r}, overwrite=True)")
        result = self._snapshot_op(
            f"overwrite {t.b_name!r}",
            [self.qimg("snapshot", "-d", t.a_name, image=self.A),
             self.qimg("snapshot", "-c", t.a_name, image=self.A)],
            lambda im, dry: im.create_snapshot(t.b_name, overwrite=True, dry_run=dry))
        if result is None:
            return
        new_id, _ = result
        del self.snaps[index]
        a_list = self.info(self.A).get("snapshots", [])
        if a_list[-1]["id"] != new_id:
            self.fail(f"overwrite: qemu-img made ID {a_list[-1]['id']!r}, qcow2snap returned "
                      f"{new_id!r}")
        self.snaps.append(Tracked(new_id, t.a_name, t.b_name, self.new_uid()))

    def delete(self) -> None:
        index = self._first_a(self.pick())   # qemu-img -d takes the first of the name
        t = self.snaps[index]
        prefer = self.rnd.choice(["name", "id", "object"])
        self.note(f"delete: A: qemu-img snapshot -d {t.a_name!r}; B: delete_snapshot(ID "
                  f"{t.id!r} via {prefer})")

        def op(image: Any, dry: bool) -> Any:
            ref = (image.find_snapshot(t.id, by="id") if prefer == "object"
                   else self._b_ref(image, t, prefer))
            return image.delete_snapshot(ref, dry_run=dry)

        if self._snapshot_op(f"delete ID {t.id}",
                             [self.qimg("snapshot", "-d", t.a_name, image=self.A)], op) is not None:
            del self.snaps[index]

    def revert(self) -> None:
        t = self.snaps[self.pick()]
        prefer = self.rnd.choice(["id", "object"])
        self.note(f"revert: A: qemu-img snapshot -a {t.id!r}; B: revert_to_snapshot(ID "
                  f"{t.id!r} via {prefer})")

        def op(image: Any, dry: bool) -> Any:
            ref = (image.find_snapshot(t.id, by="id") if prefer == "object"
                   else self._b_ref(image, t, "id"))
            return image.revert_to_snapshot(ref, dry_run=dry)

        if self._snapshot_op(f"revert to ID {t.id}",
                             [self.qimg("snapshot", "-a", t.id, image=self.A)], op) is not None:
            self.size = self.info(self.A)["virtual-size"]

    def interop(self) -> None:
        """The same snapshot operation with qemu-img on BOTH copies: QEMU must
        handle what qcow2snap wrote (its L1 copies, tables, COPIED flags)
        exactly as it handles its own."""
        full = MAX_SNAPSHOTS <= len(self.snaps) <= FULL_COMPARE_LIMIT
        choices = [] if full else ["create"]
        firsts = [i for i, t in enumerate(self.snaps)
                  if self._first_a(i) == i
                  and next(j for j, u in enumerate(self.snaps) if u.b_name == t.b_name) == i]
        if firsts:
            choices.append("delete")
        if self.snaps:
            choices.append("revert")
        if not choices:
            return
        what = self.rnd.choice(choices)
        if what == "create":
            name = self.fresh_name("q")
            cmds = [self.qimg("snapshot", "-c", name, image=image) for image in (self.A, self.B)]
        elif what == "delete":
            t = self.snaps[self.rnd.choice(firsts)]
            cmds = [self.qimg("snapshot", "-d", t.a_name, image=self.A),
                    self.qimg("snapshot", "-d", t.b_name, image=self.B)]
        else:
            t = self.snaps[self.pick()]
            cmds = [self.qimg("snapshot", "-a", t.id, image=image) for image in (self.A, self.B)]
        self.note(f"interop {what} with qemu-img on both: {' '.join(cmds[0][1:])} | "
                  f"{' '.join(cmds[1][1:])}")
        before = [self.path(image).read_bytes() for image in (self.A, self.B)]
        a, b = (self.run(*cmd) for cmd in cmds)
        if (a.returncode == 0) != (b.returncode == 0):
            self.fail(f"qemu-img {what}: A rc {a.returncode} {a.stderr.strip()!r}, "
                      f"B rc {b.returncode} {b.stderr.strip()!r}")
        if a.returncode != 0:
            self.note(f"  both refused: {a.stderr.strip()}")
            for image, data in zip((self.A, self.B), before, strict=True):
                self.path(image).write_bytes(data)
            return
        if what == "create":
            ia, ib = self.info(self.A)["snapshots"][-1], self.info(self.B)["snapshots"][-1]
            if ia["id"] != ib["id"]:
                self.fail(f"qemu-img create: ID {ia['id']} on A, {ib['id']} on B")
            self.snaps.append(Tracked(ia["id"], name, name, self.new_uid()))
        elif what == "delete":
            self.snaps.remove(t)
        else:
            self.size = self.info(self.A)["virtual-size"]

    def rename(self) -> None:
        t = self.snaps[self.pick()]
        roll = self.rnd.random()
        if roll < 0.25:
            new = self.rnd.choice(self.snaps).b_name          # duplicate name
        elif roll < 0.4:
            new = self.rnd.choice(self.snaps).id              # a name equal to an ID
        elif roll < 0.5:
            new = "r" * self.rnd.randint(100, 255)            # long (QEMU limit 255)
        else:
            new = self.fresh_name("ren")
        self.note(f"rename (B only): rename_snapshot(ID {t.id!r} {t.b_name!r} -> {new!r})")
        before = self.path(self.B).read_bytes()
        try:
            with qcow2snap.open(self.path(self.B), "r+") as image:
                image.rename_snapshot(image.find_snapshot(t.id, by="id"), new)
        except Exception as exc:
            self.path(self.B).write_bytes(before)
            self.soft_divergence(f"rename ID {t.id} -> {new!r} failed: "
                                 f"{type(exc).__name__}: {exc}")
            return
        t.b_name = new

    # ----------------------------------------------------------- checking

    def check_b(self, proc: subprocess.CompletedProcess[str]) -> None:
        checked = QemuCheck.of(proc)
        if not checked.clean:
            human = self.run(*self.qimg("check", image=self.B))
            self.fail(f"qemu-img check on B: {checked.problems}\n{human.stdout}{human.stderr}")

    def _raw(self, image: str, t: Tracked, disk_size: int, out: str) -> Path:
        """QEMU's view of snapshot ``t`` at its own disk size, as a raw file."""
        if disk_size == self.size:
            pre, arg = self.opts(image)
            self.ok("qemu-img", "convert", *pre, "-l", f"snapshot.id={t.id}", "-O", "raw", arg,
                    out)
        else:
            # convert -l pads/cuts to the current size: revert a scratch copy
            scratch = f"revert-{t.uid}-{image}"
            shutil.copyfile(self.path(image), self.path(scratch))
            self.ok(*self.qimg("snapshot", "-a", t.id, image=scratch))
            pre, arg = self.opts(scratch)
            self.ok("qemu-img", "convert", *pre, "-O", "raw", arg, out)
            self.path(scratch).unlink()
        return self.path(out)

    def compare_snapshot(self, t: Tracked, disk_size: int) -> None:
        key = (t.uid, self.size, disk_size)
        a_raw = self._a_cache.get(key)
        if a_raw is None:
            a_raw = self._raw(self.A, t, disk_size, f"cacheA-{t.uid}-{self.size}-{disk_size}.raw")
            self._a_cache[key] = a_raw
        b_raw = self._raw(self.B, t, disk_size, f"B-{t.uid}.raw")
        try:
            if a_raw.stat().st_size != b_raw.stat().st_size:
                self.fail(f"snapshot ID {t.id}: size {a_raw.stat().st_size} (A) vs "
                          f"{b_raw.stat().st_size} (B)")
            cmp = self.run("qemu-img", "compare", "-f", "raw", "-F", "raw",
                           a_raw.name, b_raw.name)
            if cmp.returncode != 0:
                self.fail(f"snapshot ID {t.id} ({t.a_name!r}/{t.b_name!r}, disk size "
                          f"{disk_size}) content differs: {cmp.stdout.strip()}")
        finally:
            b_raw.unlink()

    def compare_entries(self, a_img: Any, b_img: Any) -> None:
        """The stored snapshot entries agree byte for byte with QEMU's, but
        for where the L1 tables live, the dates of snapshots made during
        the run, and the names that renames changed.  So does the active
        L1 size.  (Fidelity, not guest-visible: differences are noted and
        reported, the run goes on.)"""
        if a_img.header.l1_size != b_img.header.l1_size:
            self.soft_divergence(f"active l1_size A {a_img.header.l1_size} "
                                 f"B {b_img.header.l1_size}")
        initial = {t.uid for t in self.snaps if t.uid <= self._initial_uids}
        for x, y, t in zip(a_img.snapshots, b_img.snapshots, self.snaps, strict=True):
            ea = a_img.pread(x.entry_offset, 40 + x.extra_data_size + len(x.id_bytes))
            eb = b_img.pread(y.entry_offset, 40 + y.extra_data_size + len(y.id_bytes))
            if t.uid not in initial:          # made by both during the run: dates differ
                ea, eb = ea[:16] + ea[24:], eb[:16] + eb[24:]
            # l1_table_offset and name_size may differ legitimately
            if ea[8:12] + ea[12:14] + ea[16:] != eb[8:12] + eb[12:14] + eb[16:]:
                key = ("entry", t.uid)
                if key not in self._reported:
                    self._reported.add(key)
                    self.soft_divergence(f"snapshot ID {t.id}: table entry differs from "
                                         f"QEMU's: A {ea.hex()} B {eb.hex()}")

    def verify(self, full: bool = False, touched: tuple[str, ...] = ()) -> None:
        jobs: dict[str, Future[Any]] = {
            "check": self.pool.submit(self.run, *self.qimg("check", "--output=json",
                                                           image=self.B)),
            "cmp": self.pool.submit(self.run, "qemu-img", "compare",
                                    *(self.opts(self.A)[0] or ["-f", "qcow2", "-F", "qcow2"]),
                                    self.opts(self.A)[1], self.opts(self.B)[1]),
            "infoA": self.pool.submit(self.info, self.A),
            "infoB": self.pool.submit(self.info, self.B),
        }
        self.check_b(jobs["check"].result())
        ia, ib = jobs["infoA"].result(), jobs["infoB"].result()
        if not (ia["virtual-size"] == ib["virtual-size"] == self.size):
            self.fail(f"virtual size A {ia['virtual-size']} B {ib['virtual-size']} "
                      f"expected {self.size}")
        if ib.get("dirty-flag"):
            self.fail("B is dirty")
        sa, sb = ia.get("snapshots", []), ib.get("snapshots", [])
        want_ids = [t.id for t in self.snaps]
        got = ([s["id"] for s in sa], [s["id"] for s in sb])
        if got != (want_ids, want_ids):
            self.fail(f"snapshot IDs: A {got[0]}, B {got[1]}, expected {want_ids}")
        if [s["name"] for s in sa] != [t.a_name for t in self.snaps]:
            self.fail(f"A names {[s['name'] for s in sa]} != {[t.a_name for t in self.snaps]}")
        if [s["name"] for s in sb] != [t.b_name for t in self.snaps]:
            self.fail(f"B names {[s['name'] for s in sb]} != {[t.b_name for t in self.snaps]}")
        for x, y, t in zip(sa, sb, self.snaps, strict=True):
            for key in ("vm-state-size", "vm-clock-sec", "vm-clock-nsec", "icount"):
                if x.get(key) != y.get(key):
                    self.fail(f"snapshot ID {t.id}: {key} A {x.get(key)} B {y.get(key)}")
            date = (y["date-sec"], y["date-nsec"])
            if t.b_date is None:
                t.b_date = date
            elif t.b_date != date:
                self.fail(f"snapshot ID {t.id}: date changed {t.b_date} -> {date}")
        with qcow2snap.open(self.path(self.A)) as a_img, qcow2snap.open(self.path(self.B)) as b_img:
            a_sizes = [(s.id, s.disk_size, s.vm_state_size) for s in a_img.snapshots]
            b_sizes = [(s.id, s.disk_size, s.vm_state_size) for s in b_img.snapshots]
            if a_img.size != b_img.size:
                self.fail(f"qcow2snap sizes A {a_img.size} B {b_img.size}")
            self.compare_entries(a_img, b_img)
        if a_sizes != b_sizes:
            self.fail(f"disk sizes (qcow2snap): A {a_sizes} B {b_sizes}")
        cmp = jobs["cmp"].result()
        if cmp.returncode != 0:
            self.fail(f"active content differs: {cmp.stdout.strip()} {cmp.stderr.strip()}")
        targets = list(zip(self.snaps, a_sizes, strict=True))
        if not full and len(targets) > FULL_COMPARE_LIMIT:
            keep = set(self.rnd.sample(range(len(targets)), 4)) | {len(targets) - 1}
            keep |= {i for i, (t, _) in enumerate(targets) if t.id in touched}
            targets = [x for i, x in enumerate(targets) if i in keep]
        futures = [self.pool.submit(self.compare_snapshot, t, disk_size)
                   for t, (_, disk_size, _) in targets]
        for future in futures:
            future.result()

    # ---------------------------------------------------------------- loop

    def choose(self) -> str:
        weights = {"write": 26, "zero": 8, "zero-unmap": 6, "discard": 7,
                   "create": 14, "overwrite": 4, "delete": 10, "revert": 11, "rename": 6,
                   "interop": 6}
        if "zlib" in self.tags or "zstd" in self.tags:
            weights["compressed"] = 8
        if "resized-grow" in self.tags or "resized-shrink" in self.tags:
            weights["resize"] = 6
        if len(self.snaps) >= MAX_SNAPSHOTS and len(self.snaps) <= FULL_COMPARE_LIMIT:
            weights["create"] = 0
        if not self.snaps:
            for k in ("overwrite", "delete", "revert", "rename"):
                weights[k] = 0
        kinds = list(weights)
        return self.rnd.choices(kinds, [weights[k] for k in kinds])[0]

    def do(self, kind: str) -> tuple[str, ...]:
        touched_before = {t.id for t in self.snaps}
        if kind in ("write", "zero", "zero-unmap", "discard", "compressed"):
            self.guest_io(kind)
        elif kind == "resize":
            self.resize()
        else:
            getattr(self, kind)()
        return tuple({t.id for t in self.snaps} ^ touched_before)


def _commit_of(value: Any) -> CommitResult:
    if isinstance(value, tuple):   # create_snapshot: (new ID, result)
        value = value[1]
    assert isinstance(value, CommitResult), value
    return value


def _comparable(result: CommitResult) -> dict[str, Any]:
    fields = dict(vars(result))
    fields.pop("dry_run")
    return fields


def run_differential(name: str, seed: int, steps: int, source: Path, workdir: Path) -> Pair:
    entry = FIXTURES_BY_NAME[name]
    tags = tuple(entry.get("tags", []))
    pair = Pair(name, seed, workdir, random.Random(f"{name}/{seed}"), tags=tags,
                secret=entry.get("secret"))
    try:
        pair.setup(source)
        pair.verify()
        for step in range(steps):
            pair.step = step
            kind = pair.choose()
            touched = pair.do(kind)
            pair.verify(touched=touched)
        pair.step = steps
        pair.verify(full=True)
    finally:
        pair.flush_log()
        pair.pool.shutdown()
    return pair


@pytest.mark.parametrize("name,seed,steps", CASES)
def test_random_sequence_matches_qemu(name: str, seed: int, steps: int, fixture_copy: Any,
                                      qemu_img: str, qemu_io: str, tmp_path: Path) -> None:
    source = fixture_copy(name)
    pair = run_differential(name, seed, steps, source, source.parent)
    if pair.soft:
        raise RefusalDivergence("qcow2snap and qemu-img disagree on refusals:\n"
                                + "\n".join(pair.soft)
                                + f"\n(full log: {tmp_path / 'steps.log'})")


def test_plan_covers_every_fixture_with_snapshots() -> None:
    """Every fixture kind that supports internal snapshots takes part."""
    unsupported = set(fixtures_with("data-file"))
    expected = {f for f in FIXTURES_BY_NAME if f not in unsupported}
    assert expected <= set(PLAN)


def test_revert_refused_like_qemu_when_refcounts_overflow(fixture_copy: Any,
                                                         qemu_img: str) -> None:
    """QEMU's goto adds the snapshot's references before it drops the active
    layer's, so with 2-bit refcounts (max 3) reverting refcount-2 (clusters
    shared by the active layer and both snapshots: refcount 3) overflows and
    qemu-img refuses ("Failed to load snapshot: Invalid argument").
    qcow2snap checks that intermediate state too, so it refuses as well,
    leaving the image unchanged."""
    path = fixture_copy("refcount-2")
    workdir = path.parent
    shutil.copyfile(path, workdir / "A.qcow2")
    proc = subprocess.run([qemu_img, "snapshot", "-a", "1", "A.qcow2"], cwd=workdir,
                          capture_output=True, text=True, check=False)
    assert proc.returncode != 0 and "Failed to load snapshot" in proc.stderr, proc.stderr
    before = path.read_bytes()
    with qcow2snap.open(path, "r+") as image, pytest.raises(RefcountOverflowError) as info:
        image.revert_to_snapshot(image.find_snapshot("1", by="id"))
    assert "reverting to snapshot" in str(info.value) and "2-bit refcounts" in str(info.value)
    assert path.read_bytes() == before


def _active_l2_entries(path: Path) -> list[tuple[int, int]]:
    """(index, entry) of every set entry of the active layer's first L2 table."""
    from qcow2snap import format as fmt
    with qcow2snap.open(path) as image:
        l1 = image.read_l1(image.layer())
        table = image.read_l2(l1[0] & fmt.L1E_OFFSET_MASK)
        return [(j, e) for j, e in enumerate(table) if e]


def _edited_by_both(base: Path, qemu_img: str, qemu_args: list[str],
                    edit: Any) -> tuple[Path, Path]:
    """Copies A and B of ``base`` beside it: A edited by ``qemu-img
    snapshot QEMU_ARGS``, B by ``edit(image)`` through the API."""
    theirs, ours = base.parent / "A.qcow2", base.parent / "B.qcow2"
    shutil.copyfile(base, theirs)
    shutil.copyfile(base, ours)
    subprocess.run([qemu_img, "snapshot", *qemu_args, str(theirs)], check=True)
    with qcow2snap.open(ours, "r+") as image:
        edit(image)
    return theirs, ours


def test_create_sets_copied_like_qemu_where_a_count_was_zero(tmp_path: Path, qemu_img: str,
                                                             qemu_io: str) -> None:
    """A create clears COPIED everywhere without looking counts up when
    every increase leaves a count of 2 or more; a referenced cluster whose
    refcount was 0 (a damaged image) ends at 1, and QEMU then sets COPIED
    on its entry.  So does qcow2snap: the entries match QEMU's bit for bit.
    (The discarded clusters ahead of it are what the edit's copies take, so
    the allocator never reaches the damaged one and refuses.)"""
    from qcow2snap import format as fmt
    base = tmp_path / "z.qcow2"
    subprocess.run([qemu_img, "create", "-q", "-f", "qcow2", str(base), "64M"], check=True)
    subprocess.run([qemu_io, "-c", "write -P 7 0 2M", "-c", "write -P 8 8M 1M",
                    "-c", "discard 0 512k", str(base)], check=True, stdout=subprocess.DEVNULL)
    with qcow2snap.open(base) as image:
        host_cluster = (dict(_active_l2_entries(base))[20] & fmt.L2E_OFFSET_MASK) >> 16
        block = int.from_bytes(image.pread(image.header.refcount_table_offset, 8), "big")
        assert image.header.refcount_order == 4
    with base.open("r+b") as f:   # its refcount (1) becomes 0
        f.seek(block + 2 * host_cluster)
        assert f.read(2) == b"\0\1"
        f.seek(block + 2 * host_cluster)
        f.write(b"\0\0")
    theirs, ours = _edited_by_both(base, qemu_img, ["-c", "s"],
                                   lambda image: image.create_snapshot("s"))
    want = _active_l2_entries(theirs)
    assert [j for j, e in want if e & fmt.QCOW_OFLAG_COPIED] == [20]
    assert _active_l2_entries(ours) == want


def _one_table_image(tmp_path: Path, qemu_img: str, qemu_io: str) -> tuple[Path, int, int]:
    """A 64 MiB image with 1 MiB written (one L2 table) and snapshot s made
    by qemu-img, so that s and the active layer share that table; returns
    it, the host cluster of its first data cluster and the file offset of
    that cluster's 16-bit refcount."""
    from qcow2snap import format as fmt
    base = tmp_path / "z.qcow2"
    subprocess.run([qemu_img, "create", "-q", "-f", "qcow2", str(base), "64M"], check=True)
    subprocess.run([qemu_io, "-c", "write -P 7 0 1M", str(base)], check=True,
                   stdout=subprocess.DEVNULL)
    subprocess.run([qemu_img, "snapshot", "-c", "s", str(base)], check=True)
    with qcow2snap.open(base) as image:
        host_cluster = (dict(_active_l2_entries(base))[0] & fmt.L2E_OFFSET_MASK) >> 16
        block = int.from_bytes(image.pread(image.header.refcount_table_offset, 8), "big")
        assert image.header.refcount_order == 4
    return base, host_cluster, block + 2 * host_cluster


def _set_refcount16(path: Path, offset: int, count: int) -> None:
    with path.open("r+b") as f:
        f.seek(offset)
        f.write(count.to_bytes(2, "big"))


def _refcount16(path: Path, offset: int) -> int:
    with path.open("rb") as f:
        f.seek(offset)
        return int.from_bytes(f.read(2), "big")


def test_revert_to_a_shared_table_refused_like_qemu_at_the_maximum(
        tmp_path: Path, qemu_img: str, qemu_io: str) -> None:
    """A revert skips the tables the snapshot shares with the active layer
    (their +1 and -1 cancel), but QEMU adds before it takes away: a cluster
    of such a table whose refcount is already 65,535 overflows on the way,
    and qemu-img refuses.  qcow2snap refuses too, changing nothing (it
    failed with the skip taken regardless)."""
    base, _, refcount_offset = _one_table_image(tmp_path, qemu_img, qemu_io)
    _set_refcount16(base, refcount_offset, 0xFFFF)
    theirs = tmp_path / "A.qcow2"
    shutil.copyfile(base, theirs)
    proc = subprocess.run([qemu_img, "snapshot", "-a", "s", str(theirs)],
                          capture_output=True, text=True, check=False)
    assert proc.returncode != 0 and "Failed to load snapshot" in proc.stderr, proc.stderr
    before = base.read_bytes()
    with qcow2snap.open(base, "r+") as image, pytest.raises(RefcountOverflowError) as info:
        image.revert_to_snapshot("s")
    assert "reverting to snapshot" in str(info.value) and "16-bit refcounts" in str(info.value)
    assert base.read_bytes() == before


def test_revert_to_a_shared_table_just_below_the_maximum_matches_qemu(
        tmp_path: Path, qemu_img: str, qemu_io: str) -> None:
    """One below the maximum the intermediate count fits, so QEMU reverts;
    the skip's bound (highest count plus what the shared tables could add)
    does not fit, so qcow2snap counts the shared tables as QEMU does and
    must end where QEMU ends: same count, same disk, same check report."""
    base, _, refcount_offset = _one_table_image(tmp_path, qemu_img, qemu_io)
    _set_refcount16(base, refcount_offset, 0xFFFE)
    theirs, ours = _edited_by_both(base, qemu_img, ["-a", "s"],
                                   lambda image: image.revert_to_snapshot("s"))
    assert _refcount16(ours, refcount_offset) == _refcount16(theirs, refcount_offset) == 0xFFFE
    subprocess.run([qemu_img, "compare", "-q", str(theirs), str(ours)], check=True)
    assert _active_l2_entries(ours) == _active_l2_entries(theirs)
    reports = [json.loads(subprocess.run([qemu_img, "check", "--output=json", str(p)],
                                         capture_output=True, text=True, check=False).stdout)
               for p in (theirs, ours)]
    for report in reports:
        report.pop("filename")
        report.pop("image-end-offset")
    assert reports[0] == reports[1]
    assert reports[0]["leaks"] == 1


def test_a_revert_counts_no_table_the_snapshot_shares(tmp_path: Path, qemu_img: str,
                                                      qemu_io: str, monkeypatch: Any) -> None:
    """Reverting to a snapshot made just before shares every table: nothing
    is added or taken away (it counted each of the table's 17 clusters up
    and down again), and the image is QEMU's: clean, same disk, same
    COPIED flags."""
    from qcow2snap.ops.transaction import Transaction
    base, _, _ = _one_table_image(tmp_path, qemu_img, qemu_io)
    counted: list[int] = []
    add_references, add_reference_run = Transaction.add_references, Transaction.add_reference_run

    def spy_references(self: Transaction, clusters: Any, amount: int) -> None:
        clusters = list(clusters)
        counted.extend(clusters)
        add_references(self, clusters, amount)

    def spy_run(self: Transaction, first: int, count: int, amount: int) -> None:
        counted.extend(range(first, first + count))
        add_reference_run(self, first, count, amount)

    monkeypatch.setattr(Transaction, "add_references", spy_references)
    monkeypatch.setattr(Transaction, "add_reference_run", spy_run)
    theirs, ours = _edited_by_both(base, qemu_img, ["-a", "s"],
                                   lambda image: image.revert_to_snapshot("s"))
    assert counted == []
    subprocess.run([qemu_img, "compare", "-q", str(theirs), str(ours)], check=True)
    assert _active_l2_entries(ours) == _active_l2_entries(theirs)
    assert_qemu_clean(qemu_img, ours)


# --------------------------------------------------------------------------
# A real QEMU loads VM snapshots of an image qcow2snap edited


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def _monitor_session(qemu_system: str, workdir: Path, image: str, bios: str,
                     commands: list[str]) -> list[tuple[str, str]]:
    """Run HMP ``commands`` (quit appended) in qemu-system-x86_64 started as
    tools/make_fixtures.py starts it; return (command, its output) pairs."""
    entry = FIXTURES_BY_NAME["savevm"]["savevm"]
    args = [qemu_system, "-machine", f"{entry['machine']},accel={entry['accel']}",
            "-nodefaults", "-display", "none", "-m", str(entry["memory_mib"]),
            "-bios", bios, "-drive", f"file={image},format=qcow2,if=ide",
            "-monitor", "stdio", "-S"]
    proc = subprocess.run(args, cwd=workdir, check=False, input="".join(c + "\n" for c in commands)
                          + "quit\n", capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, (proc.returncode, proc.stdout[-3000:], proc.stderr[-3000:])
    assert not proc.stderr.strip(), proc.stderr
    # each "(qemu) " prompt is followed by the echo of a command and its output
    text = _ANSI.sub("", proc.stdout).replace("\r", "")
    chunks = text.split("(qemu) ")[1:]
    out = []
    for command, chunk in zip([*commands, "quit"], chunks, strict=False):
        # the echo is redrawn character by character, the output follows the last newline
        lines = chunk.split("\n", 1)
        out.append((command, lines[1] if len(lines) > 1 else ""))
    assert len(out) == len(commands) + 1, text[-3000:]
    return out


def test_qemu_loadvm_after_qcow2snap_edits(fixture_copy: Any, qemu_img: str, qemu_io: str,
                                           tmp_path: Path) -> None:
    qemu_system = require_tool("qemu-system-x86_64")
    path = fixture_copy("savevm")
    workdir = path.parent
    bios = FIXTURES_BY_NAME["savevm"]["savevm"]["bios"][:-3]
    assert (workdir / bios).exists()

    def q(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(list(args), cwd=workdir, capture_output=True, text=True,
                              check=True, timeout=120)

    # expected disk content of the VM snapshots, before any edit
    for sid, out in (("1", "pre.raw"), ("3", "paused.raw")):
        q(qemu_img, "convert", "-l", f"snapshot.id={sid}", "-O", "raw", path.name, out)
    q(qemu_img, "convert", "-O", "raw", path.name, "at-create.raw")

    with qcow2snap.open(path, "r+") as image:
        assert [(s.name, s.has_vm_state) for s in image.snapshots] == [
            ("pre", True), ("run", True), ("paused", True)]
        new_id, _ = image.create_snapshot("disk-only")
        image.delete_snapshot(image.find_snapshot("run", by="name"))
        assert [s.name for s in image.snapshots] == ["pre", "paused", "disk-only"]
    q(qemu_io, "-f", "qcow2", "-c", "write -P 0x77 0x30000 8k", "-c", "write -P 0x78 0x7ff000 64k",
      path.name)

    results = _monitor_session(qemu_system, workdir, path.name, bios, [
        "loadvm paused", "info status", "xp /4xh 0x10000",
        "loadvm pre", "info status", "xp /4xh 0x10000",
        "loadvm disk-only",           # negative control: QEMU refuses disk-only snapshots
    ])
    by_step = list(results)
    for command, output in by_step[:6]:
        assert "rror" not in output and "fail" not in output.lower(), (command, output)
    assert by_step[0][1].strip() == ""                       # loadvm paused: silent
    assert by_step[1][1].startswith("VM status: paused"), by_step[1]
    assert "0xa55a 0xa55a 0xa55a 0xa55a" in by_step[2][1], by_step[2]   # RAM of the loop BIOS
    assert by_step[3][1].strip() == ""                       # loadvm pre: silent
    assert by_step[4][1].startswith("VM status: paused"), by_step[4]
    assert "0x0000 0x0000 0x0000 0x0000" in by_step[5][1], by_step[5]   # "pre": not yet run
    assert "disk-only snapshot" in by_step[6][1], by_step[6]            # the control works

    # the disk was reverted to "pre" by QEMU, and the image is clean
    assert_qemu_clean(qemu_img, path.name, cwd=workdir)
    cmp = subprocess.run([qemu_img, "compare", "-f", "qcow2", "-F", "raw", path.name,
                          "pre.raw"], cwd=workdir, capture_output=True, text=True, check=False)
    assert cmp.returncode == 0, cmp.stdout
    with qcow2snap.open(path) as image:
        assert [s.name for s in image.snapshots] == ["pre", "paused", "disk-only"]
        assert image.find_snapshot(new_id, by="id").name == "disk-only"
    # the disk-only snapshot still holds what the disk was when it was made
    for ref, expected in (("paused", "paused.raw"), ("disk-only", "at-create.raw")):
        q(qemu_img, "convert", "-l", f"snapshot.name={ref}", "-O", "raw", path.name, "now.raw")
        cmp = subprocess.run([qemu_img, "compare", "-f", "raw", "-F", "raw", "now.raw",
                              expected], cwd=workdir, capture_output=True, text=True,
                             check=False)
        assert cmp.returncode == 0, (ref, cmp.stdout)
