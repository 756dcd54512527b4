"""Layer 3: the opened image — geometry, snapshot lookup, companions, the
forensic no-write rule, QEMU lock detection, and the extents API."""

from __future__ import annotations

import ast
import hashlib
import os
import subprocess
import time
import warnings
from pathlib import Path
from typing import Any

import pytest
from conftest import FIXTURE_ENTRIES, FIXTURES_BY_NAME, ROOT, fixture_path, sha256_file

import qcow2snap
from qcow2snap import (
    AmbiguousSnapshotError,
    ExtentKind,
    ImageInUseError,
    ImageInUseWarning,
    NoVMStateError,
    SnapshotNotFoundError,
    UnsupportedImageError,
)


def test_geometry_and_header(fixture_dir: Path) -> None:
    with qcow2snap.open(fixture_path(fixture_dir, "extended-l2")) as image:
        assert image.extended_l2
        assert image.l2_entry_size == 16
        assert image.l2_bits == image.cluster_bits - 4
        assert image.subcluster_size == image.cluster_size // 32
    with qcow2snap.open(fixture_path(fixture_dir, "clusters-512")) as image:
        assert image.cluster_size == 512
        assert image.l2_entries == 64
    with qcow2snap.open(fixture_path(fixture_dir, "v2")) as image:
        assert image.header.version == 2
        assert image.header.refcount_order == 4


@pytest.mark.parametrize("name", [f["name"] for f in FIXTURE_ENTRIES])
def test_header_extensions_and_table_rebuild_byte_identical(name: str, fixture_dir: Path) -> None:
    """Parsing and rebuilding the header, its extensions and the snapshot
    table gives back exactly the bytes on disk."""
    path = fixture_path(fixture_dir, name)
    raw = path.read_bytes()
    with qcow2snap.open(path) as image:
        h = image.header
        assert h.to_bytes() == raw[:h.header_length]
        ext_bytes = b"".join(e.to_bytes() for e in image.extensions)
        assert ext_bytes == raw[h.header_length:h.header_length + len(ext_bytes)]
        assert image.extensions[-1].type == 0  # the end marker was found
        table = image.snapshot_table
        if image.snapshots:
            assert table.to_bytes() == raw[h.snapshots_offset:h.snapshots_offset + table.size]
            for sn in image.snapshots:
                assert sn.to_bytes() == raw[sn.entry_offset:sn.entry_offset + sn.entry_length]


def test_snapshot_fields(fixture_dir: Path) -> None:
    entry = FIXTURES_BY_NAME["savevm"]
    with qcow2snap.open(fixture_path(fixture_dir, "savevm")) as image:
        for sn, expected in zip(image.snapshots, entry["snapshots"], strict=True):
            assert (sn.id, sn.name, sn.disk_size) == (expected["id"], expected["name"],
                                                     expected["disk_size"])
            assert sn.vm_state_size == expected["vm_state_size"] > 0
            assert sn.icount is None  # savevm stores -1
            assert sn.date.tzinfo is not None and sn.date.timestamp() == pytest.approx(
                sn.date_sec + sn.date_nsec / 1e9, abs=1e-6)
    with qcow2snap.open(fixture_path(fixture_dir, "v3-basic")) as image:
        assert all(sn.icount == 0 for sn in image.snapshots)  # qemu-img snapshot -c stores 0
        assert all(not sn.has_vm_state for sn in image.snapshots)


def test_ambiguous_references(fixture_dir: Path) -> None:
    with qcow2snap.open(fixture_path(fixture_dir, "ambiguous")) as image:
        by_id = {s.id: s for s in image.snapshots}
        names = [s.name for s in image.snapshots]
        clash = next(s for s in image.snapshots if s.name in by_id and by_id[s.name] is not s)
        with pytest.raises(AmbiguousSnapshotError) as info:
            image.find_snapshot(clash.name)
        assert len(info.value.candidates) == 2
        assert "by_id" in str(info.value) or "--by-id" in str(info.value)
        assert image.find_snapshot(clash.name, by="id") is by_id[clash.name]
        assert image.find_snapshot(clash.name, by="name") is clash
        dup = next(n for n in names if names.count(n) > 1)
        with pytest.raises(AmbiguousSnapshotError):
            image.find_snapshot(dup, by="name")
        with pytest.raises(SnapshotNotFoundError, match="no snapshot named 'nope'"):
            image.find_snapshot("nope", by="name")


def test_snapshot_reader_uses_its_own_size(fixture_dir: Path) -> None:
    for name in ("resized-grow", "resized-shrink"):
        entry = FIXTURES_BY_NAME[name]
        with qcow2snap.open(fixture_path(fixture_dir, name)) as image:
            sizes = {s["id"]: s["disk_size"] for s in entry["snapshots"]}
            assert len(set(sizes.values()) | {image.size}) > 1
            for sn in image.snapshots:
                with image.open_disk(sn) as disk:
                    assert disk.size == sizes[sn.id]
                    assert disk.seek(0, os.SEEK_END) == sizes[sn.id]
                    assert disk.read(10) == b""


def test_reader_is_a_seekable_raw_io(fixture_dir: Path) -> None:
    entry = FIXTURES_BY_NAME["v3-basic"]
    with qcow2snap.open(fixture_path(fixture_dir, "v3-basic")) as image:
        sn = image.snapshots[0]
        with image.open_disk(sn) as disk:
            assert disk.readable() and disk.seekable() and not disk.writable()
            whole = disk.read()
            assert hashlib.sha256(whole).hexdigest() == entry["snapshots"][0]["sha256"]
            disk.seek(12345)
            assert disk.read(1000) == whole[12345:13345]
            buf = bytearray(777)
            disk.seek(-777, os.SEEK_END)
            assert disk.readinto(buf) == 777 and bytes(buf) == whole[-777:]
            assert disk.pread(5, 10) == whole[5:15]
        assert disk.closed


def test_empty_snapshot_l1_reads_zeros_not_active(fixture_dir: Path) -> None:
    """A snapshot of an empty disk must not fall back to the active L1."""
    with qcow2snap.open(fixture_path(fixture_dir, "empty-snapshot")) as image:
        empty = image.snapshots[0]
        data = image.open_disk(empty).read()
        assert data == bytes(len(data))
        assert any(image.open_disk().read())


def test_extents_cover_the_disk(fixture_dir: Path) -> None:
    for name in ("v3-basic", "compressed-zlib", "extended-l2", "zero-clusters",
                 "backing-chain"):
        with qcow2snap.open(fixture_path(fixture_dir, name)) as image:
            for sn in (None, *image.snapshots):
                size = image.layer(sn).size
                pos = 0
                kinds = set()
                for ext in image.extents(sn):
                    assert ext.guest_offset == pos and ext.length > 0
                    kinds.add(ext.kind)
                    if ext.kind is ExtentKind.DATA:
                        assert ext.host_offset is not None
                    pos = ext.guest_end
                assert pos == size
    with qcow2snap.open(fixture_path(fixture_dir, "compressed-zlib")) as image:
        assert any(e.kind is ExtentKind.COMPRESSED for e in image.extents())
    with qcow2snap.open(fixture_path(fixture_dir, "zero-clusters")) as image:
        assert any(e.kind is ExtentKind.ZERO for e in image.extents())


def test_backing_file_override_and_disable(fixture_dir: Path, tmp_path: Path) -> None:
    path = fixture_path(fixture_dir, "backing-chain")
    base = fixture_dir / FIXTURES_BY_NAME["backing-chain"]["companions"][0][:-3]
    moved = tmp_path / "elsewhere.qcow2"
    moved.write_bytes(base.read_bytes())
    with qcow2snap.open(path) as image:
        normal = image.open_disk().read()
        assert image.backing_path() == str(base)
    with qcow2snap.open(path, backing_file=moved) as image:
        assert image.open_disk().read() == normal
    with qcow2snap.open(path, backing_file=False) as image:
        assert image.backing is None
        assert image.open_disk().read() != normal
    lonely = tmp_path / "lonely.qcow2"
    lonely.write_bytes(path.read_bytes())
    with (qcow2snap.open(lonely) as image,
          pytest.raises(UnsupportedImageError, match=r"backing file .* not found")):
        image.open_disk().read()


def test_encrypted_image_lists_but_does_not_read(fixture_dir: Path) -> None:
    """Without its passphrase an encrypted image lists but does not read."""
    with qcow2snap.open(fixture_path(fixture_dir, "luks")) as image:
        assert image.encrypted and image.snapshots
        with pytest.raises(qcow2snap.BadPassphraseError, match="encrypted"):
            image.open_disk()


def test_data_file_image_reads_active_layer(fixture_dir: Path) -> None:
    entry = FIXTURES_BY_NAME["data-file"]
    with qcow2snap.open(fixture_path(fixture_dir, "data-file")) as image:
        assert image.has_data_file and image.data_file_name
        assert hashlib.sha256(image.open_disk().read()).hexdigest() == entry["active"]["sha256"]


def test_vm_state_of_disk_only_snapshot_is_refused(fixture_dir: Path) -> None:
    with (qcow2snap.open(fixture_path(fixture_dir, "v3-basic")) as image,
          pytest.raises(NoVMStateError, match="disk-only")):
        image.open_vm_state(image.snapshots[0])


def test_reading_never_writes(fixture_copy, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The forensic rule: bytes and mtime unchanged, file opened read-only."""
    for name in ("savevm", "compressed-zstd", "backing-chain", "resized-shrink"):
        path = fixture_copy(name)
        past = time.time() - 86400
        os.utime(path, (past, past))
        before = (sha256_file(path), os.stat(path).st_mtime_ns)
        with qcow2snap.open(path) as image:
            for sn in (None, *image.snapshots):
                image.open_disk(sn).read()
                if sn is not None and sn.has_vm_state:
                    image.open_vm_state(sn).read()
            flags = int(Path(f"/proc/self/fdinfo/{image._file.fd}").read_text().split(
                "flags:")[1].split()[0], 8)
            assert flags & os.O_ACCMODE == os.O_RDONLY
        assert (sha256_file(path), os.stat(path).st_mtime_ns) == before


def test_dirty_image_is_reported_not_fixed(fixture_copy) -> None:  # type: ignore[no-untyped-def]
    path = fixture_copy("v3-basic")
    raw = bytearray(path.read_bytes())
    raw[79] |= 1  # incompatible_features: dirty bit
    path.write_bytes(raw)
    with qcow2snap.open(path) as image:
        assert image.dirty
        image.open_disk(image.snapshots[0]).read()
    assert path.read_bytes() == raw


def test_lock_of_a_running_qemu_is_detected(fixture_copy, qemu_io: str) -> None:  # type: ignore[no-untyped-def]
    path = fixture_copy("v3-basic")
    holder = subprocess.Popen([qemu_io, "-c", "sleep 5000", str(path)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 5
        while True:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                with qcow2snap.open(path) as image:
                    state = image.lock_state
            if state is not None and state.has_writer:
                break
            assert time.time() < deadline, "qemu-io never took its locks"
            time.sleep(0.05)
        assert any(issubclass(w.category, ImageInUseWarning) for w in caught)
        assert "running QEMU" in str(caught[0].message)
        assert state.in_use and state.forbids_writers
    finally:
        holder.kill()
        holder.wait()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with qcow2snap.open(path) as image:
            assert image.lock_state is not None and not image.lock_state.in_use


def test_own_editor_locks_are_not_taken_for_qemu(fixture_copy) -> None:  # type: ignore[no-untyped-def]
    """While this process edits an image, a second handle reads it without a
    'running QEMU' warning, and a second editor is refused by name."""
    path = fixture_copy("v3-basic")
    with qcow2snap.open(path, "r+") as editor:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with qcow2snap.open(path) as reader:
                assert reader.lock_state is not None
                assert reader.lock_state.edited_by_this_process
                assert not reader.lock_state.in_use
                assert [s.name for s in reader.snapshots] == [s.name for s in editor.snapshots]
        with pytest.raises(ImageInUseError) as info:
            qcow2snap.open(path, "r+")
        assert str(info.value) == (f"{path} is already open for editing (mode 'r+') in this "
                                   f"process; close that handle before opening another for "
                                   f"editing")
    with qcow2snap.open(path, "r+") as editor:  # released on close
        assert editor.lock_state is not None and not editor.lock_state.edited_by_this_process


LAYERS = [("errors",), ("format", "layouts", "tables", "vmstate"), ("model",),
          ("cache", "hostfile", "locks", "crypto", "luks", "reader", "image", "copier", "refcount"),
          ("ops",), ("describe",), ("cli", "commands", "lazy_group")]


def _import_graph() -> dict[str, set[str]]:
    """Every module of the package (``ops.x`` for the operations) and the
    package modules it imports: at the top, inside functions and under
    TYPE_CHECKING alike (a typing-only import back is still a tangle)."""
    package = ROOT / "qcow2snap"
    graph: dict[str, set[str]] = {}
    for path in sorted(package.rglob("*.py")):
        rel = path.relative_to(package).with_suffix("")
        # a subpackage's __init__ is the subpackage ("vmstate"), as importers name it
        module = ".".join(rel.parts[:-1] if rel.parts[-1] == "__init__" else rel.parts)
        if module in ("", "__main__", "ops"):
            continue
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = list(rel.parts[:-1])[:len(rel.parts) - node.level]
                parts = [*base, *(node.module.split(".") if node.module else [])]
                if node.module:
                    targets.add(".".join(parts))
                else:
                    targets.update(".".join([*parts, a.name]) for a in node.names)
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("qcow2snap"):
                targets.add((node.module or "").removeprefix("qcow2snap."))
        graph[module] = {t for t in targets if t and t != "ops"} - {module}
    # "from . import __version__" names the package, not a module
    modules = set(graph)
    return {m: {t for t in targets if t in modules} for m, targets in graph.items()}


def _layer_of(module: str) -> str:
    return module.split(".", 1)[0] if module.startswith(("ops.", "vmstate.")) else module


def test_imports_go_one_way_through_the_layers() -> None:
    """format/tables -> model -> image/reader/copier -> ops -> describe -> cli:
    every module has a layer, a module imports only modules of its own or an
    earlier layer (errors from anywhere), and only the CLI layer imports click."""
    rank = {name: i for i, group in enumerate(LAYERS) for name in group}
    graph = _import_graph()
    unplaced = sorted(m for m in graph if _layer_of(m) not in rank)
    assert not unplaced, f"modules without a layer in LAYERS: {unplaced}"
    for module, targets in graph.items():
        for target in targets:
            top = _layer_of(target)
            assert rank[top] <= rank[_layer_of(module)] or top == "errors", (
                f"{module} imports {target}: layers must point downwards")
    for path in (ROOT / "qcow2snap").rglob("*.py"):
        if path.name not in ("cli.py", "commands.py", "lazy_group.py"):
            assert "import click" not in path.read_text() and "from click" not in \
                path.read_text(), f"{path.name} imports click"


def test_public_exceptions_live_in_errors_and_are_exported() -> None:
    """Every public exception class of the package is defined in errors.py
    and importable from the package (private control-flow signals, named
    with a leading underscore, stay where they are used)."""
    import importlib
    import inspect
    import pkgutil

    import qcow2snap.errors
    for info in pkgutil.walk_packages(qcow2snap.__path__, "qcow2snap."):
        if info.name.endswith(".__main__") or info.name == "qcow2snap.errors":
            continue   # running __main__ is the CLI
        module = importlib.import_module(info.name)
        for name, obj in vars(module).items():
            if (inspect.isclass(obj) and issubclass(obj, BaseException)
                    and obj.__module__ == info.name and not name.startswith("_")):
                raise AssertionError(f"{info.name}.{name} is an exception class outside "
                                     f"errors.py")
    for name in qcow2snap.errors.__all__:
        assert getattr(qcow2snap, name) is getattr(qcow2snap.errors, name), name
        assert name in qcow2snap.__all__, name


#: Modules may exceed this many lines only with a reason in their docstring.
MODULE_LINE_LIMIT = 700


def test_long_modules_say_why() -> None:
    """A module over ~700 lines says in its docstring why it is one module."""
    for path in sorted((ROOT / "qcow2snap").rglob("*.py")):
        text = path.read_text()
        if text.count("\n") <= MODULE_LINE_LIMIT:
            continue
        doc = ast.get_docstring(ast.parse(text)) or ""
        assert "lines" in doc and "because" in doc, (
            f"{path.relative_to(ROOT)} has {text.count(chr(10))} lines: split it, or say in "
            f"its docstring why it is one module ('... lines because ...')")


def test_no_import_cycles() -> None:
    """No module reaches itself through imports, inside a layer either
    (image and reader used to import each other)."""
    graph = _import_graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(module: str) -> None:
        state[module] = 1
        stack.append(module)
        for target in sorted(graph.get(module, ())):
            if state.get(target) == 1:
                cycle = [*stack[stack.index(target):], target]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if target in graph and not state.get(target):
                visit(target)
        stack.pop()
        state[module] = 2

    for module in sorted(graph):
        if not state.get(module):
            visit(module)


@pytest.mark.parametrize("mode", ["r", "r+"])
@pytest.mark.parametrize("name", ["backing-chain", "raw-backing", "data-file"])
def test_reads_fall_through_to_companions_in_either_mode(name: str, mode: str,
                                                         fixture_copy: Any,
                                                         fixture_dir: Path) -> None:
    """An image opened "r+" whose backing file is a qcow2 raised
    AttributeError ('Qcow2Image' object has no attribute 'read') on the
    first read of an unallocated range: the reader told backing kinds apart
    by the type of the image it read from.  Every mode reads every backing
    kind (and an external data file) alike."""
    path = fixture_copy(name)
    with qcow2snap.open(fixture_dir / FIXTURES_BY_NAME[name]["file"][:-3]) as image:
        expected = image.open_disk().readall()
        holes = [e for e in image.extents() if e.kind is ExtentKind.UNALLOCATED]
    assert holes or name == "data-file"
    with qcow2snap.open(path, mode) as image, image.open_disk() as disk:  # type: ignore[call-overload]
        for hole in holes[:4]:
            disk.seek(hole.guest_offset)
            assert disk.read(min(hole.length, 1 << 20)) == \
                expected[hole.guest_offset:hole.guest_offset + min(hole.length, 1 << 20)]
        disk.seek(0)
        assert disk.read() == expected
