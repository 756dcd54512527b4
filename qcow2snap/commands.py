"""The ``qcow2snap`` commands other than ``info`` and ``list`` (top layer).

They are declared as in :mod:`qcow2snap.cli` (arguments, options, help
texts; no logic) and registered on its group, but in this module, which
:class:`~qcow2snap.lazy_group.LazyGroup` imports when one of them is used:
``info`` and ``list`` do not pay at start-up for the ~170 options of the
others.  The module is about 770 lines because every one of those commands'
arguments, options and help texts is declared here, one block per command.
"""

from __future__ import annotations

import sys
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import click

from . import describe
from .cli import (
    _by,
    _echo_text,
    _kdf_iteration_limit,
    _layer_label,
    _one_line,
    _open,
    _passphrase,
    _print_json,
    _progress_option,
    _snapshot,
    cli,
    edit_options,
    image_options,
    snapshot_selection,
)
from .errors import ImageInUseWarning, Qcow2Error
from .image import open as open_image

if TYPE_CHECKING:
    from .ops.edit import EditResult


class _TerminalLike:
    """stderr as click's bar sees it under an explicit --progress: a
    terminal, so that the bar is drawn (with carriage returns) even into a
    pipe or a log file, where click would print only the label."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream

    def isatty(self) -> bool:
        return True

    def write(self, text: str) -> int:
        return int(self._stream.write(text))

    def flush(self) -> None:
        self._stream.flush()


@contextmanager
def _progress_bar(enabled: bool | None, label: str) -> Iterator[Callable[[int, int], None] | None]:
    """A click progress bar on stderr (bytes done/total, rate, ETA) when
    stderr is a terminal or ``--progress`` is given."""
    forced = enabled is True
    if enabled is None:
        enabled = sys.stderr.isatty()
    if not enabled:
        yield None
        return
    state: dict[str, Any] = {"bar": None, "done": 0}

    def show(done: int, total: int) -> None:
        bar = state["bar"]
        if bar is None:
            stream: Any = _TerminalLike(sys.stderr) if forced else sys.stderr
            bar = click.progressbar(length=max(total, 1), label=label, file=stream,
                                    show_pos=False, show_percent=True, show_eta=True,
                                    item_show_func=lambda _: None,
                                    info_sep="  ", width=30)
            bar.format_progress_line = _bar_line(bar)  # type: ignore[method-assign]
            bar.__enter__()
            state["bar"] = bar
        bar.update(done - state["done"])
        state["done"] = done

    try:
        yield show
    finally:
        if state["bar"] is not None:
            state["bar"].__exit__(None, None, None)


def _bar_line(bar: Any) -> Callable[[], str]:
    """Extend click's line with bytes done / total and the rate."""
    original = bar.format_progress_line

    def line() -> str:
        elapsed = time.time() - bar.start
        rate = bar.pos / elapsed if elapsed > 0 else 0.0
        extra = (f"  {describe.size_to_str(bar.pos)}/{describe.size_to_str(bar.length)}"
                 f"  {describe.size_to_str(int(rate))}/s")
        return str(original()) + extra

    return line


@cli.command()
@click.argument("snapshot")
@click.argument("image", type=click.Path(dir_okay=False))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False),
              help="Output file (written under a temporary name, renamed when complete).")
@click.option("-O", "--format", "out_format", type=click.Choice(["raw", "qcow2"]),
              default="raw", show_default=True, help="Output format.")
@click.option("-c", "--compress", is_flag=True,
              help="qcow2 output: compress data clusters (deflate, as qemu-img convert -c).")
@click.option("--compression-type", type=click.Choice(["zlib", "zstd"]), default=None,
              help="Compression for -c: zlib (deflate, the default) or zstd. Implies -c.")
@click.option("-f", "--force", is_flag=True, help="Replace OUTPUT if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Print what was written as JSON.")
@snapshot_selection
@_progress_option
@image_options
def extract(snapshot: str, image: str, output: str, out_format: str, compress: bool,
            compression_type: str | None, force: bool, as_json: bool, by_id: bool,
            by_name: bool, progress: bool | None, backing_file: str | None, no_backing: bool,
            data_file: str | None, allow_dirs: tuple[str, ...]) -> None:
    """Write the disk of SNAPSHOT in IMAGE to OUTPUT.

    SNAPSHOT is an ID or a name; '-' means the active layer (a snapshot
    really named '-' is reached with --by-name -).
    Raw output equals `qemu-img convert -l snapshot.id=ID -O raw` and is
    sparse; qcow2 output is a standalone image (no backing file, no
    snapshots).
    """
    from .ops.extract import extract as do_extract
    compression = compression_type or ("zlib" if compress else None)
    if compression and out_format != "qcow2":
        raise click.UsageError("--compress needs -O qcow2")
    with _open(image, backing_file, no_backing, data_file, allow_dirs) as img:
        ref = _snapshot(img, snapshot, by_id, by_name, active=True)
        with _progress_bar(progress, f"extract {_layer_label(ref)}") as callback:
            result = do_extract(img, ref, output, format=out_format,  # type: ignore[arg-type]
                                compress=compression, progress=callback,  # type: ignore[arg-type]
                                overwrite=force, backing=not no_backing)
    if as_json:
        _print_json(describe.extract_result_json(result))


@cli.command()
@click.argument("image", type=click.Path(dir_okay=False))
@click.option("-o", "--output", type=click.Path(dir_okay=False),
              help="Output file (written under a temporary name, fsynced, renamed when "
                   "complete).")
@click.option("--in-place", is_flag=True,
              help="Replace IMAGE: write the compacted copy beside it, verify every layer "
                   "against it, then rename it over IMAGE (editors are refused meanwhile).")
@click.option("--compress", type=click.Choice(["zlib", "zstd"]), default=None,
              help="Compress the data clusters of every layer (snapshots included) with "
                   "deflate (zlib) or zstd; sets the image's compression type.")
@click.option("--no-backing", "merge", is_flag=True,
              help="Merge the backing chain into the output (every layer reads as before, "
                   "without a backing file).")
@click.option("--allow-dir", "allow_dirs", multiple=True, type=click.Path(file_okay=False),
              help="With --no-backing: also follow backing files IMAGE names in DIR.")
@click.option("-f", "--force", is_flag=True, help="Replace OUTPUT if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Print what was written as JSON.")
@_progress_option
def compact(image: str, output: str | None, in_place: bool, compress: str | None, merge: bool,
            allow_dirs: tuple[str, ...], force: bool, as_json: bool,
            progress: bool | None) -> None:
    """Rewrite IMAGE without its free, leaked and punched space, keeping
    every internal snapshot (and its VM state) and the active layer.

    Clusters that layers share stay shared (each written once); each layer's
    data lies in guest order, the active layer's first.  Give -o OUTPUT or
    --in-place.
    """
    from .ops.compact import compact as do_compact
    from .ops.compact import compact_in_place
    if in_place == (output is not None):
        raise click.UsageError("give -o OUTPUT or --in-place (one of them)")
    with _progress_bar(progress, "compact") as callback:
        if in_place:
            result = compact_in_place(image, progress=callback, compress=compress,
                                      merge_backing=merge, allow_dirs=allow_dirs)
        else:
            assert output is not None
            with open_image(image, backing_file=None if merge else False,
                            allow_dirs=allow_dirs) as img:
                result = do_compact(img, output, overwrite=force, progress=callback,
                                    compress=compress, merge_backing=merge)
    if as_json:
        _print_json(describe.compact_json(result))
    else:
        _echo_text(describe.compact_text(result))


@cli.group()
def vmstate() -> None:
    """Work with the VM state saved by `savevm` in a snapshot."""


@vmstate.command("dump")
@click.argument("snapshot")
@click.argument("image", type=click.Path(dir_okay=False))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False),
              help="Output file for the QEVM migration stream.")
@click.option("-f", "--force", is_flag=True, help="Replace OUTPUT if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Print what was written as JSON.")
@snapshot_selection
@_progress_option
@image_options
def vmstate_dump(snapshot: str, image: str, output: str, force: bool, as_json: bool,
                 by_id: bool, by_name: bool, progress: bool | None, backing_file: str | None,
                 no_backing: bool, data_file: str | None, allow_dirs: tuple[str, ...]) -> None:
    """Write the saved VM state of SNAPSHOT (exactly vm-state-size bytes of
    QEMU's migration stream, starting with QEVM) to OUTPUT.

    The VM state is read from IMAGE only, never from a backing file (QEMU
    keeps no VM state there); the backing options are accepted for symmetry
    with extract."""
    from .ops.extract import dump_vm_state
    with _open(image, backing_file, no_backing, data_file, allow_dirs) as img:
        ref = _snapshot(img, snapshot, by_id, by_name)
        assert ref is not None
        with _progress_bar(progress, f"vmstate {ref.id} ({ref.name})") as callback:
            result = dump_vm_state(img, ref, output, progress=callback, overwrite=force)
    if as_json:
        _print_json(describe.vm_state_dump_json(result))


@vmstate.command("info")
@click.argument("snapshot")
@click.argument("image", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@snapshot_selection
@_progress_option
@image_options
def vmstate_info(snapshot: str, image: str, as_json: bool, by_id: bool, by_name: bool,
                 progress: bool | None, backing_file: str | None, no_backing: bool,
                 data_file: str | None, allow_dirs: tuple[str, ...]) -> None:
    """Show what the VM state of SNAPSHOT holds: machine type, run state at
    save time (prelaunch, running, paused, suspended, ...), RAM blocks,
    devices, page size and whether the stream is complete.

    A damaged or truncated stream is reported (complete: NO), not refused.
    """
    from .ops.memory import vm_state_info
    with _open(image, backing_file, no_backing, data_file, allow_dirs) as img:
        ref = _snapshot(img, snapshot, by_id, by_name)
        assert ref is not None
        with _progress_bar(progress, f"vmstate {ref.id} ({ref.name})") as callback:
            state = vm_state_info(img, ref, progress=callback)
    if as_json:
        _print_json(describe.vm_state_json(state, ref))
    else:
        _echo_text(describe.vm_state_text(state, ref))


def _size_option(value: str | None) -> int | None:
    if value is None:
        return None
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    text = value.strip().lower().removesuffix("b").removesuffix("i")
    factor = units.get(text[-1:], 1)
    number = text[:-1] if text[-1:] in units else text
    try:
        return int(float(number) * factor)
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a size (e.g. 2G, 3072M)") from None


@vmstate.command("memory")
@click.argument("snapshot")
@click.argument("image", type=click.Path(dir_okay=False))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False),
              help="Output file (written under a temporary name, renamed when complete).")
@click.option("--format", "out_format", type=click.Choice(["raw", "elf", "lime"]),
              default="raw", show_default=True,
              help="raw: guest-physical image (file offset = address); elf: ELF core like "
                   "QEMU's dump-guest-memory; lime: LiME file (Volatility, other tools).")
@click.option("--block", "block", metavar="NAME",
              help="Write only this RAM block, as it is (see `vmstate info`).")
@click.option("--max-ram-below-4g", "max_ram_below_4g", metavar="SIZE",
              help="The machine option of that name, if the VM was started with it.")
@click.option("-f", "--force", is_flag=True, help="Replace OUTPUT if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Print what was written as JSON.")
@snapshot_selection
@_progress_option
@image_options
def vmstate_memory(snapshot: str, image: str, output: str, out_format: str, block: str | None,
                   max_ram_below_4g: str | None, force: bool, as_json: bool, by_id: bool,
                   by_name: bool, progress: bool | None, backing_file: str | None,
                   no_backing: bool, data_file: str | None, allow_dirs: tuple[str, ...]) -> None:
    """Write the guest RAM saved in SNAPSHOT to OUTPUT, without QEMU.

    Zero pages become holes (the output is sparse). raw, elf and lime need an
    x86 pc or q35 machine; --block works for any machine.
    """
    from .ops.memory import export_memory
    if block is not None and out_format != "raw":
        raise click.UsageError(
            f"--block writes the block as it is; it excludes --format {out_format}")
    below = _size_option(max_ram_below_4g)
    with _open(image, backing_file, no_backing, data_file, allow_dirs) as img:
        ref = _snapshot(img, snapshot, by_id, by_name)
        assert ref is not None
        with _progress_bar(progress, f"memory {ref.id} ({ref.name})") as callback:
            result = export_memory(img, ref, output, format=out_format,  # type: ignore[arg-type]
                                   block=block, max_ram_below_4g=below, progress=callback,
                                   overwrite=force)
    if as_json:
        _print_json(describe.memory_result_json(result))


def _edit_report(results: list[EditResult], as_json: bool, dry_run: bool) -> None:
    """Print one line (or one JSON object) per image; exit non-zero if any
    failed (describe says how)."""
    if as_json:
        _print_json(describe.edit_results_json(results, dry_run=dry_run))
    else:
        lines, errors, warnings_ = describe.edit_results_text(results, dry_run=dry_run)
        for line in errors:
            click.echo(f"qcow2snap: error: {_one_line(line)}", err=True)
        for line in lines:
            _echo_text(line)
        for line in warnings_:
            click.echo(f"qcow2snap: warning: {_one_line(line)}", err=True)
    status = describe.edit_exit_status(results)
    if status:
        raise SystemExit(status)


@cli.command()
@click.argument("name")
@click.argument("images", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--overwrite", is_flag=True,
              help="Replace an existing snapshot of that name (as QEMU's savevm does).")
@edit_options
def create(name: str, images: tuple[str, ...], overwrite: bool, dry_run: bool,
           as_json: bool) -> None:
    """Create a disk-only snapshot NAME in each IMAGE (like `qemu-img snapshot -c`).

    Several IMAGES are one VM's disks: all are checked first, and if any
    check fails none is changed.
    """
    from .ops.edit import edit_images
    _edit_report(edit_images(images, "create", name=name, overwrite=overwrite,
                             dry_run=dry_run), as_json, dry_run)


@cli.command()
@click.argument("snapshot")
@click.argument("images", nargs=-1, required=True, type=click.Path(dir_okay=False))
@snapshot_selection
@edit_options
def delete(snapshot: str, images: tuple[str, ...], by_id: bool, by_name: bool, dry_run: bool,
           as_json: bool) -> None:
    """Delete SNAPSHOT from each IMAGE and reclaim its space.

    Freed clusters at the end of the file are truncated away, others are
    punched out, so disk usage really drops.
    """
    from .ops.edit import edit_images
    _edit_report(edit_images(images, "delete", snapshot=snapshot, by=_by(by_id, by_name),
                             dry_run=dry_run), as_json, dry_run)


@cli.command()
@click.argument("snapshot")
@click.argument("images", nargs=-1, required=True, type=click.Path(dir_okay=False))
@snapshot_selection
@edit_options
def revert(snapshot: str, images: tuple[str, ...], by_id: bool, by_name: bool, dry_run: bool,
           as_json: bool) -> None:
    """Revert each IMAGE's disk to SNAPSHOT (like `qemu-img snapshot -a`).

    The image takes the snapshot's disk size when it differs.
    """
    from .ops.edit import edit_images
    _edit_report(edit_images(images, "revert", snapshot=snapshot, by=_by(by_id, by_name),
                             dry_run=dry_run), as_json, dry_run)


@cli.command()
@click.argument("snapshot")
@click.argument("new_name")
@click.argument("images", nargs=-1, required=True, type=click.Path(dir_okay=False))
@snapshot_selection
@edit_options
def rename(snapshot: str, new_name: str, images: tuple[str, ...], by_id: bool, by_name: bool,
           dry_run: bool, as_json: bool) -> None:
    """Rename SNAPSHOT to NEW_NAME in each IMAGE (the ID stays)."""
    from .ops.edit import edit_images
    _edit_report(edit_images(images, "rename", snapshot=snapshot, name=new_name,
                             by=_by(by_id, by_name), dry_run=dry_run), as_json, dry_run)


@cli.command()
@click.argument("image", type=click.Path(dir_okay=False))
@click.option("-r", "--repair", type=click.Choice(["leaks", "all"]), default=None,
              help="leaks: lower refcounts that are too high. all: also raise refcounts that "
                   "are too low (rebuilding the refcount structures if needed), fix COPIED "
                   "flags and rewrite the snapshot table from the salvaged entries.")
@click.option("--dry-run", is_flag=True,
              help="With --repair: show what would change (snapshots kept, fixed, dropped; "
                   "clusters; header fields) and write nothing.")
@click.option("--json", "as_json", is_flag=True,
              help="Print JSON: qemu-img check's keys plus findings and snapshot verdicts.")
@_progress_option
def check(image: str, repair: str | None, dry_run: bool, as_json: bool,
          progress: bool | None) -> None:
    """Check IMAGE's metadata like `qemu-img check`, and repair it.

    Without --repair the image is opened read-only and never written.
    Every reference is recomputed (header, refcount structures, active and
    snapshot L1/L2 tables and data, VM state, the snapshot table) and
    compared with the stored refcounts; COPIED flags and the snapshot table
    are checked too. A damaged snapshot table is salvaged: snapshots whose
    own metadata is sound are kept, IDs and names are recovered, and the L1
    table of a snapshot whose pointer is broken is searched for.

    Exit status as qemu-img check: 0 clean, 2 corruptions remain, 3 only
    leaks remain, 1 the check could not be completed (including a snapshot
    table QEMU cannot read without -r all). A repair refuses an image a
    running QEMU holds.
    """
    from .ops.check_or_repair import check_or_repair
    from .ops.check_report import CheckReport
    if dry_run and repair is None:
        raise click.UsageError("--dry-run needs --repair leaks or --repair all")
    with _progress_bar(progress, "check") as callback:
        report = check_or_repair(image, repair, dry_run=dry_run,  # type: ignore[arg-type]
                                 progress=callback)
    lost = None
    if isinstance(report, CheckReport) and report.leaks:  # an orphaned L1 is a leak or free
        from .ops.recover import recover_report
        try:
            lost = recover_report(image)
        except Qcow2Error:
            lost = None
    if as_json:
        obj = describe.check_json(report)
        if lost is not None and describe.lost_snapshots_json(lost):
            obj["lost-snapshots"] = describe.lost_snapshots_json(lost)
        _print_json(obj)
    else:
        line = describe.lost_snapshots_line(lost, image) if lost is not None else None
        _echo_text(describe.check_text(report) + (f"\n{line}" if line else ""))
    raise SystemExit(report.exit_code)


@cli.command(name="hash")
@click.argument("image", type=click.Path(dir_okay=False))
@click.argument("snapshots", nargs=-1)
@click.option("-a", "--algorithm", type=click.Choice(["sha256", "sha1", "md5", "sha512",
                                                      "blake2b"]),
              default="sha256", show_default=True, help="Digest algorithm.")
@click.option("--image", "include_image", is_flag=True,
              help="Also hash the image file itself, as it is on disk.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@snapshot_selection
@_progress_option
@image_options
def hash_(image: str, snapshots: tuple[str, ...], algorithm: str, include_image: bool,
          as_json: bool, by_id: bool, by_name: bool, progress: bool | None,
          backing_file: str | None, no_backing: bool, data_file: str | None,
          allow_dirs: tuple[str, ...]) -> None:
    """Print digests of the disks and VM states of SNAPSHOTs in IMAGE.

    A snapshot's disk digest is that of what `qemu-img convert -l
    snapshot.id=ID -O raw` writes (its own disk size, read through the
    backing chain); its VM-state digest is that of what `vmstate dump`
    writes. SNAPSHOT is an ID or a name; '-' means the active layer. Without
    SNAPSHOT: every snapshot, then the active layer. The image is only read.
    """
    from .ops.hashing import hash_image
    with _open(image, backing_file, no_backing, data_file, allow_dirs) as img:
        refs = ([_snapshot(img, ref, by_id, by_name, active=True) for ref in snapshots]
                if snapshots else None)
        with _progress_bar(progress, f"hash {algorithm}") as callback:
            report = hash_image(img, refs, algorithm=algorithm, include_image=include_image,
                                backing=not no_backing, progress=callback)
    if as_json:
        _print_json(describe.hash_json(report))
    else:
        _echo_text(describe.hash_text(report))


@cli.command(name="map")
@click.argument("snapshot")
@click.argument("image", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True,
              help="Print JSON: qemu-img map --output=json's entries under \"map\", with "
                   "provenance.")
@click.option("--strict", is_flag=True,
              help="Stop with an error at the first damaged table instead of reporting "
                   "damaged ranges.")
@snapshot_selection
@_progress_option
@image_options
def map_(snapshot: str, image: str, as_json: bool, strict: bool, by_id: bool, by_name: bool,
         progress: bool | None, backing_file: str | None, no_backing: bool,
         data_file: str | None, allow_dirs: tuple[str, ...]) -> None:
    """Show where the guest disk of SNAPSHOT in IMAGE lives, like `qemu-img map`.

    SNAPSHOT is an ID or a name; '-' means the active layer. For a snapshot
    the map equals qemu-img map after `qemu-img snapshot -a` on a copy. The
    file offsets of the snapshot table entry, the L1 table and each L2 table
    used are shown beside it. Damaged tables are reported as damaged ranges
    (exit status 3) unless --strict stops at the first.
    """
    from .ops.map import map_layer
    with _open(image, backing_file, no_backing, data_file, allow_dirs) as img:
        ref = _snapshot(img, snapshot, by_id, by_name, active=True)
        with _progress_bar(progress, f"map {_layer_label(ref)}") as callback:
            result = map_layer(img, ref, name=image, backing=not no_backing, strict=strict,
                               progress=callback)
    if as_json:
        _print_json(describe.map_json(result))
    else:
        _echo_text(describe.map_text(result))
    if not result.complete:
        raise SystemExit(3)


@cli.command()
@click.argument("a")
@click.argument("b")
@click.argument("image", type=click.Path(dir_okay=False))
@click.option("--content", is_flag=True,
              help="Also read the differing ranges of both sides and drop the clusters whose "
                   "bytes are equal (cost follows the changed data, not the disk size).")
@click.option("--strict", is_flag=True,
              help="Stop with an error at damaged L1/L2 metadata instead of reporting the "
                   "damaged ranges and going on.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@snapshot_selection
@_progress_option
@image_options
def diff(a: str, b: str, image: str, content: bool, strict: bool, as_json: bool, by_id: bool,
         by_name: bool, progress: bool | None, backing_file: str | None, no_backing: bool,
         data_file: str | None, allow_dirs: tuple[str, ...]) -> None:
    """Show the guest ranges where the disks of A and B in IMAGE differ.

    A and B are snapshots (ID or name) or '-' for the active layer. By
    default only metadata is compared (no guest data is read): ranges whose
    mapping differs (host cluster, data / zero / unallocated / compressed).
    With --content the clusters whose bytes are equal are dropped. Where the
    disk sizes differ, the tail of the larger disk is reported whole.
    """
    from .ops.diff import diff_layers
    with _open(image, backing_file, no_backing, data_file, allow_dirs) as img:
        ref_a = _snapshot(img, a, by_id, by_name, active=True)
        ref_b = _snapshot(img, b, by_id, by_name, active=True)
        label = f"diff {_layer_label(ref_a)} {_layer_label(ref_b)}"
        with _progress_bar(progress, label) as callback:
            result = diff_layers(img, ref_a, ref_b, content=content, progress=callback,
                                 strict=strict)
    if as_json:
        _print_json(describe.diff_json(result))
    else:
        _echo_text(describe.diff_text(result))


@cli.command()
@click.argument("images", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True,
              help="Print JSON: a list with one object per image.")
@_progress_option
def usage(images: tuple[str, ...], as_json: bool, progress: bool | None) -> None:
    """Show where the space of each IMAGE goes (read-only).

    Per layer (the active layer and each snapshot): the clusters it
    references, those only it references (what deleting the snapshot alone
    frees, as `qemu-img snapshot -d` does) and those shared. Per image:
    guest data, VM state, each kind of metadata, free and leaked clusters,
    and what a compaction would give back.
    """
    from .ops.usage import usage as usage_of
    reports = []
    for path in images:
        with _progress_bar(progress, "usage") as callback:
            reports.append(usage_of(path, progress=callback))
    if as_json:
        _print_json([describe.usage_json(r) for r in reports])
    else:
        _echo_text("\n\n".join(describe.usage_text(r) for r in reports))


@cli.command()
@click.argument("image", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option("--apply", "apply", is_flag=True,
              help="Re-create snapshot-table entries for the reliable candidates.")
@click.option("--dry-run", is_flag=True, help="With --apply: report, write nothing.")
@_progress_option
def recover(image: str, as_json: bool, apply: bool, dry_run: bool,
            progress: bool | None) -> None:
    """Find snapshots lost from IMAGE's snapshot table.

    Searches the clusters no live structure references for stale copies of
    the snapshot table and for orphaned L1 tables, and reports each
    candidate with its source, identity and reliability: guest ranges whose
    L2 table or data cluster a live structure uses now are listed as
    reused. Without --apply the image is never written. With --apply the
    reliable candidates get snapshot-table entries again (crash-safe, under
    the editor lock); unreliable ones are refused.
    """
    if dry_run and not apply:
        raise click.UsageError("--dry-run needs --apply")
    if apply:
        from .ops.recover_apply import recover_snapshots
        with _progress_bar(progress, "recover") as callback:
            result = recover_snapshots(image, dry_run=dry_run, progress=callback)
        if as_json:
            _print_json(describe.recover_apply_json(result))
        else:
            _echo_text(describe.recover_apply_text(result))
        return
    from .ops.recover import recover_report
    with _progress_bar(progress, "recover") as callback:
        report = recover_report(image, progress=callback)
    if as_json:
        _print_json(describe.recover_json(report))
    else:
        _echo_text(describe.recover_text(report))


@cli.command()
@click.argument("snapshot")
@click.argument("image", type=click.Path(dir_okay=False))
@click.option("--socket", "socket_path", type=click.Path(dir_okay=False), metavar="PATH",
              help="Listen on the Unix socket PATH (removed when the server stops).")
@click.option("--port", type=click.IntRange(0, 65535), metavar="N",
              help="Listen on TCP port N instead (see --bind).")
@click.option("--bind", metavar="ADDR", default="127.0.0.1", show_default=True,
              help="With --port: the address to listen on.")
@click.option("--threads", type=click.IntRange(min=1), metavar="N",
              help="nbdkit's worker threads per connection (default: nbdkit's, 16).")
@snapshot_selection
@image_options
def serve(snapshot: str, image: str, socket_path: str | None, port: int | None, bind: str,
          threads: int | None, by_id: bool, by_name: bool, backing_file: str | None,
          no_backing: bool, data_file: str | None, allow_dirs: tuple[str, ...]) -> None:
    """Export the disk of SNAPSHOT in IMAGE read-only over NBD (nbdkit).

    SNAPSHOT is an ID or a name; '-' means the active layer. Runs nbdkit
    with its Python plugin in the foreground until Ctrl-C or SIGTERM; the
    export has block status (holes and zeros), allows several connections
    and refuses writes. Needs nbdkit and nbdkit-plugin-python.
    """
    from .ops.serve import ServeOptions, export_summary, find_nbdkit
    from .ops.serve import serve as run_server
    if (socket_path is None) == (port is None):
        raise click.UsageError("give exactly one of --socket PATH and --port N")
    nbdkit = find_nbdkit()
    with _open(image, backing_file, no_backing, data_file, allow_dirs) as img:
        ref = _snapshot(img, snapshot, by_id, by_name, active=True)
        img.open_disk(ref)   # refused here (passphrase, data file) rather than in nbdkit
    options = ServeOptions(image, None if ref is None else ref.id, socket_path, port, bind,
                           backing_file, no_backing, data_file, allow_dirs,
                           _kdf_iteration_limit(), threads)
    for uri in export_summary(options):
        click.echo(f"qcow2snap: serving {_layer_label(ref)} of {image} read-only at {uri}",
                   err=True)
    run_server(options, passphrase=_passphrase(), nbdkit=nbdkit)


@cli.command()
@click.argument("images", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.argument("mountpoint", type=click.Path(file_okay=False))
@click.option("--background", is_flag=True,
              help="Go to the background once the mount is ready (default: stay in the "
                   "foreground until unmounted, Ctrl-C or SIGTERM).")
@click.option("-f", "--force", is_flag=True,
              help="Mount even an image a running QEMU writes (what is read may be "
                   "inconsistent).")
@click.option("--direct-io", is_flag=True,
              help="Serve the disk files without the kernel's page cache: big sequential "
                   "reads are faster, but nothing is cached and they cannot be mmap'ed shared.")
@image_options
def mount(images: tuple[str, ...], mountpoint: str, background: bool, force: bool,
          direct_io: bool, backing_file: str | None, no_backing: bool, data_file: str | None,
          allow_dirs: tuple[str, ...]) -> None:
    """Mount every snapshot of IMAGE (a VM's disks: several IMAGEs) read-only.

    MOUNTPOINT gets `active/` and one `ID-NAME/` directory per snapshot,
    each with the guest disk as a raw file (`disk.raw`; with several IMAGEs
    `<image stem>.raw`), and for snapshots with a saved VM state
    `vmstate.bin`, `memory.raw`, `memory.elf`, `memory.lime` and
    `info.json`. Holes are reported (SEEK_HOLE), so `cp --sparse` skips
    them. Unmount with `fusermount3 -u MOUNTPOINT` or Ctrl-C. Needs
    qcow2snap[mount] and libfuse 3.
    """
    from contextlib import ExitStack

    from .ops.mount import MountTree, check_mountpoint, lock_images, serve_fuse
    if len(images) > 1 and (backing_file or data_file):
        raise click.UsageError("--backing-file and --data-file need a single IMAGE")
    check_mountpoint(mountpoint)

    def info_json(members: list[tuple[str, Any]]) -> bytes:
        obj: Any = (describe.snapshot_json(members[0][1]) if len(images) == 1
                    else {disk: describe.snapshot_json(facts) for disk, facts in members})
        return ("".join(describe.json_parts(obj)) + "\n").encode()

    with ExitStack() as stack:
        opened = []
        for path in images:
            with warnings.catch_warnings():   # lock_images says it, or refuses
                warnings.simplefilter("ignore", ImageInUseWarning)
                opened.append(stack.enter_context(
                    _open(path, backing_file, no_backing, data_file, allow_dirs)))
        for message in lock_images(opened, force=force):
            click.echo(f"qcow2snap: warning: {_one_line(message)}", err=True)
        tree = MountTree(list(zip(images, opened, strict=True)), info_json)
        serve_fuse(tree, mountpoint, background=background, direct_io=direct_io)


@cli.command()
@click.argument("image", type=click.Path(dir_okay=False))
@click.option("--dry-run", is_flag=True,
              help="Check and plan (free clusters, bytes to punch and to truncate) and write "
                   "nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print the plan and the result as JSON.")
@_progress_option
def trim(image: str, dry_run: bool, as_json: bool, progress: bool | None) -> None:
    """Give IMAGE's free clusters back to the file system, in place.

    After a full check, clusters whose refcount is 0 and that nothing
    references are punched out, and free clusters after the last one in use
    are truncated away. Refused on a dirty or corrupt image, one whose
    check finds corruptions or leaks (run `check --repair leaks` first), a
    block device, and an image a running QEMU or another editor holds.
    """
    from .ops.trim import trim_image
    with _progress_bar(progress, "trim") as callback:
        result = trim_image(image, dry_run=dry_run, progress=callback)
    if as_json:
        _print_json(describe.trim_json(result))
    else:
        _echo_text(describe.trim_text(result))


@cli.command(name="export-chain")
@click.argument("image", type=click.Path(dir_okay=False))
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--order", type=click.Choice(["date", "id", "name"]), default="date",
              show_default=True,
              help="Order of the layers in the chain: by snapshot date, ID or name (ties by ID); "
                   "the active layer is always last.")
@click.option("-f", "--force", is_flag=True,
              help="Replace DIRECTORY if it is not empty (its old content is removed once the "
                   "new one is in place).")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest written as JSON.")
@_progress_option
@image_options
def export_chain(image: str, directory: str, order: str, force: bool, as_json: bool,
                 progress: bool | None, backing_file: str | None, no_backing: bool,
                 data_file: str | None, allow_dirs: tuple[str, ...]) -> None:
    """Turn IMAGE's internal snapshots into an external backing chain in
    DIRECTORY.

    One qcow2 file per snapshot and one for the active layer: the first
    holds its whole disk, each next one only the clusters that differ from
    the previous one, over it as its backing file (a relative name). Also
    written: chain.json (IDs, names, dates, VM clocks, sizes) and each VM
    state as a `vmstate dump` file. DIRECTORY must be absent or empty; it
    appears only when complete.
    """
    from .ops.chain import export_chain as do_export
    with (_open(image, backing_file, no_backing, data_file, allow_dirs) as img,
          _progress_bar(progress, "export-chain") as callback):
        result = do_export(img, directory, order=order,  # type: ignore[arg-type]
                           overwrite=force, progress=callback)
    if as_json:
        _print_json(describe.export_chain_json(result))
    else:
        _echo_text(describe.export_chain_text(result))


@cli.command(name="import-chain")
@click.argument("top", type=click.Path(dir_okay=False))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False),
              help="Output image (written under a temporary name, renamed when complete).")
@click.option("-f", "--force", is_flag=True, help="Replace OUTPUT if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Print what was written as JSON.")
@_progress_option
@image_options
def import_chain(top: str, output: str, force: bool, as_json: bool, progress: bool | None,
                 backing_file: str | None, no_backing: bool, data_file: str | None,
                 allow_dirs: tuple[str, ...]) -> None:
    """Turn TOP's external backing chain into one image with internal
    snapshots.

    Every qcow2 layer below TOP becomes a snapshot (oldest first, ID 1 up,
    named after its file without the extension) and TOP's disk the active
    layer of OUTPUT; clusters are shared where layers read the same bytes.
    """
    from .ops.chain_import import import_chain as do_import
    with (_open(top, backing_file, no_backing, data_file, allow_dirs) as img,
          _progress_bar(progress, "import-chain") as callback):
        result = do_import(img, output, overwrite=force, progress=callback)
    if as_json:
        _print_json(describe.import_chain_json(result))
    else:
        _echo_text(describe.import_chain_text(result))
