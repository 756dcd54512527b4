"""What a check and a repair report (operations layer): findings, the
verdict on each snapshot table entry, the check's report and the repair's.

A :class:`CheckReport` is one check's result, counted as ``qemu-img check``
counts; a :class:`RepairReport` is a repair's: the first check, the re-check
after writing ("Double checking the fixed image now", as qemu-img does) and
what the repair changed.  Rendering is :mod:`qcow2snap.describe`'s.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from .transaction import CommitResult

__all__ = [
    "MAX_FINDINGS_PER_KIND",
    "CheckReport",
    "Finding",
    "Progress",
    "RepairMode",
    "RepairReport",
    "Severity",
    "SnapshotVerdict",
    "VerdictStatus",
]

Severity = Literal["leak", "corruption", "error", "info"]
VerdictStatus = Literal["ok", "damaged", "lost", "not-a-snapshot", "fixed", "dropped"]
RepairMode = Literal["leaks", "all"]
#: ``progress(done, total)``, called as a check advances
Progress = Callable[[int, int], None]

#: Findings stored per kind (all are counted); a damaged 1 TiB image must
#: not produce a million objects.
MAX_FINDINGS_PER_KIND = 1000


@dataclass(frozen=True)
class Finding:
    """One problem.  ``severity`` says how it is counted (as qemu-img check
    counts it): ``leak``, ``corruption``, ``error`` (QEMU's "check error":
    the check could not be completed by QEMU's rules) or ``info`` (not
    counted).  ``repairable`` names the least ``--repair`` mode that fixes
    it (``"leaks"`` or ``"all"``), or is ``None``."""

    kind: str
    severity: Severity
    offset: int | None
    structure: str
    message: str
    repairable: RepairMode | None

    def to_json(self) -> dict[str, object]:
        return {"kind": self.kind, "severity": self.severity, "offset": self.offset,
                "structure": self.structure, "message": self.message,
                "repairable": self.repairable is not None, "repair-mode": self.repairable}


@dataclass
class SnapshotVerdict:
    """What check (and repair) make of one snapshot table entry.

    ``status``:

    * ``ok``: sound (kept as is by any repair);
    * ``damaged``: its entry has problems that ``--repair all`` fixes while
      keeping the snapshot (``detail`` says which);
    * ``lost``: its L1 pointer is broken and its L1 table was not found;
      ``--repair all`` drops it (its data cannot be reached);
    * ``not-a-snapshot``: the entry is not one (an empty entry past the real
      end of the table); ``--repair all`` drops it;
    * after ``--repair all``: ``fixed`` (kept, entry rewritten) or
      ``dropped`` (removed, named here)."""

    index: int
    id: str
    name: str
    status: VerdictStatus
    detail: str = ""
    l1_table_offset: int = 0
    l1_size: int = 0

    def to_json(self) -> dict[str, object]:
        return {"index": self.index, "id": self.id, "name": self.name, "status": self.status,
                "detail": self.detail, "l1-table-offset": self.l1_table_offset,
                "l1-size": self.l1_size}


@dataclass
class CheckReport:
    """The result of one check: qemu-img check's counts, the findings and a
    verdict on every snapshot table entry."""

    filename: str
    format: str = "qcow2"
    check_errors: int = 0
    corruptions: int = 0
    leaks: int = 0
    image_end_offset: int = 0
    total_clusters: int = 0
    allocated_clusters: int = 0
    fragmented_clusters: int = 0
    compressed_clusters: int = 0
    findings: list[Finding] = field(default_factory=list)
    findings_omitted: int = 0
    snapshots: list[SnapshotVerdict] = field(default_factory=list)
    dirty: bool = False
    corrupt_bit: bool = False

    @property
    def exit_code(self) -> int:
        """qemu-img check's: 0 clean, 1 check not completed, 2 corruptions,
        3 only leaks."""
        if self.check_errors:
            return 1
        if self.corruptions:
            return 2
        if self.leaks:
            return 3
        return 0

    @property
    def clean(self) -> bool:
        return self.exit_code == 0


@dataclass
class RepairReport:
    """The result of a repair (or of a dry run of one).

    ``before`` is the first check; ``after`` the check of the repaired image
    (``None`` for a dry run, or when the repair stopped before writing:
    ``--repair leaks`` on an image whose refcount structures need a
    rebuild).  ``snapshots`` holds the repair's verdict on every entry
    (``fixed``, ``dropped``, ...), ``changes`` what was (or would be)
    written, ``commit`` the last commit's result.  ``leaks_fixed`` and
    ``corruptions_fixed`` compare the two checks as qemu-img does."""

    mode: RepairMode
    dry_run: bool
    before: CheckReport
    after: CheckReport | None = None
    changes: list[str] = field(default_factory=list)
    snapshots: list[SnapshotVerdict] = field(default_factory=list)
    rebuilt_refcounts: bool = False
    commit: CommitResult | None = None
    leaks_fixed: int = 0
    corruptions_fixed: int = 0

    @property
    def filename(self) -> str:
        return self.before.filename

    @property
    def final(self) -> CheckReport:
        """The state the image is in now: the re-check, or the first check
        when nothing was written."""
        return self.after if self.after is not None else self.before

    @property
    def exit_code(self) -> int:
        """qemu-img check -r's: the final check's status."""
        return self.final.exit_code
