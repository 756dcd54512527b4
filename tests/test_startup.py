"""Start-up: what ``qcow2snap info``/``list`` import (no timings).

A command pays at start for every module it imports.  These tests run the
real command line in a child process under ``python -X importtime`` (which
names every module as it is imported) and check that the metadata-only
commands load none of the modules that only other commands use
(docs/performance.md, "Start-up").
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

#: loaded by commands that copy, decompress in threads, export memory,
#: check, hash, edit or unlock an encrypted image; ``construct`` (with the
#: ``pdb``, ``hashlib`` and ``pickle`` its package imports) loads with the
#: layouts (qcow2snap.layouts), which the metadata-only commands do not need:
#: they parse with format.FIXED_LAYOUTS (docs/performance.md, "Start-up,
#: second pass")
NOT_AT_START = frozenset({
    "ctypes", "mmap", "concurrent.futures",  # the copier and heap tuning
    "qcow2snap.copier",
    "qcow2snap.vmstate", "qcow2snap.ops.runstate",  # savevm streams
    "qcow2snap.ops.check_report", "qcow2snap.ops.edit", "qcow2snap.ops.extract",
    "zstandard",
    "construct", "qcow2snap.layouts", "pdb", "hashlib", "pickle",  # the layouts
    "qcow2snap.luks",  # encrypted images
    "qcow2snap.commands",  # the other commands (cli.LazyGroup)
    # ISA-L (three extension modules) and zlib: at the first compressed
    # cluster; the traceback module: for --debug; package metadata: never
    # (--version is a literal) (docs/performance.md, "Start-up, third pass")
    "isal", "isal.isal_zlib", "zlib", "traceback", "textwrap", "importlib.metadata",
})
#: loaded by --json only
NOT_FOR_TEXT = frozenset({"json", "json.encoder", "json.decoder"})


def imported_by(*args: str | Path) -> tuple[set[str], subprocess.CompletedProcess[str]]:
    """The modules ``python -m qcow2snap ARGS`` imports, and its run."""
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "qcow2snap",
                           *map(str, args)],
                          capture_output=True, text=True, timeout=120, check=False)
    rows = [line.split("|") for line in proc.stderr.splitlines()
            if line.startswith("import time:")]
    # "import time: SELF | CUMULATIVE | NAME" (indented by depth), after a header
    return {row[2].strip() for row in rows if len(row) == 3 and row[1].strip().isdigit()}, proc


@pytest.mark.parametrize("command", [("list",), ("list", "--json"), ("info",),
                                     ("info", "--json")],
                         ids=["list", "list-json", "info", "info-json"])
def test_metadata_commands_import_only_what_they_use(fixture_copy: Any,
                                                    command: tuple[str, ...]) -> None:
    image = fixture_copy("v3-basic")
    modules, proc = imported_by(*command, image)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "third" in proc.stdout  # the listing itself is there
    # the importtime report is read right: these are imported by every command
    assert {"qcow2snap.format", "qcow2snap.cli", "click"} <= modules
    assert sorted(modules & NOT_AT_START) == []
    if "--json" not in command:
        assert sorted(modules & NOT_FOR_TEXT) == []


#: what the console script runs (``from qcow2snap.cli import main; main()``),
#: then the modules loaded, read from ``sys.modules`` after the command ended
_RUN_MAIN = """\
import sys
from qcow2snap.cli import main
try:
    main(sys.argv[1:])
finally:
    sys.stderr.write("\\nMODULES " + " ".join(sorted(sys.modules)) + "\\n")
"""


@pytest.mark.parametrize("command", [("list",), ("info",)], ids=["list", "info"])
def test_the_console_script_path_leaves_the_heavy_modules_unloaded(
        fixture_copy: Any, command: tuple[str, ...]) -> None:
    """The installed ``qcow2snap`` script calls ``cli.main()``: after a
    whole ``info``/``list`` run, none of the modules it does not use is in
    ``sys.modules`` (whoever imported them, lazily or not)."""
    image = fixture_copy("v3-basic")
    proc = subprocess.run([sys.executable, "-c", _RUN_MAIN, *command, str(image)],
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "third" in proc.stdout
    modules = set(proc.stderr.rpartition("\nMODULES ")[2].split())
    assert {"qcow2snap.cli", "qcow2snap.ops.inspection", "click"} <= modules
    assert sorted(modules & (NOT_AT_START | NOT_FOR_TEXT)) == []


def test_listing_a_vm_state_loads_the_stream_reader(fixture_copy: Any) -> None:
    """The savevm walker loads when a snapshot has a VM state (its run
    state is listed), and the same report shows it."""
    image = fixture_copy("savevm")
    modules, proc = imported_by("list", image)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "qcow2snap.ops.runstate" in modules


def test_data_commands_still_tune_the_allocator(fixture_copy: Any, tmp_path: Path) -> None:
    """Commands that read guest data load the copier to tune glibc's heap
    (copier.prefer_heap_reuse), as main() always did."""
    image = fixture_copy("v3-basic")
    modules, proc = imported_by("extract", "first", image, "-o", tmp_path / "out.raw")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert {"qcow2snap.copier", "ctypes"} <= modules


def test_an_edit_loads_the_layouts(fixture_copy: Any) -> None:
    """An edit builds the header with construct: the layouts load then, and
    the same report shows them (the metadata-only test above can fail)."""
    image = fixture_copy("v3-basic")
    modules, proc = imported_by("create", "fourth", image)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert {"qcow2snap.layouts", "construct"} <= modules


def test_a_check_loads_neither_the_repair_nor_the_copier(fixture_copy: Any) -> None:
    """``check`` without ``--repair`` reads metadata only: the repair and its
    transaction, the copier, its threads and ctypes stay unloaded (they cost
    ~30 ms of a check's start-up), and so do the listing's facts
    (``ops.inspection``, ~2.5 ms); ``--repair`` loads the transaction."""
    image = fixture_copy("v3-basic")
    modules, proc = imported_by("check", image)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "No errors were found" in proc.stdout
    assert "qcow2snap.ops.check" in modules
    assert sorted(modules & {"qcow2snap.ops.repair", "qcow2snap.ops.transaction",
                             "qcow2snap.copier", "ctypes", "mmap",
                             "concurrent.futures", "qcow2snap.ops.inspection"}) == []
    modules, proc = imported_by("check", "--repair", "leaks", image)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "qcow2snap.ops.transaction" in modules
