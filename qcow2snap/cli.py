"""The ``qcow2snap`` command line (top layer).

Each command parses its arguments, calls one library function and renders
the result with :mod:`qcow2snap.describe`.  Errors are funnelled through
:class:`_Group`: every :class:`~qcow2snap.errors.Qcow2Error` and ``OSError``
becomes one line on stderr and the exit status of its class (``--debug``
shows the traceback instead).
"""

from __future__ import annotations

import itertools
import json
import signal
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any, Literal, TypeVar

import click

from . import __version__, describe
from .errors import Qcow2Error
from .image import ImageInUseWarning, Qcow2Image
from .image import open as open_image

F = TypeVar("F", bound=Callable[..., Any])


class _Terminated(BaseException):
    """SIGTERM or SIGHUP arrived: unwind like Ctrl-C does, so that every
    cleanup runs (a half-written output's temporary file is removed)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _terminate(signum: int, frame: Any) -> None:
    raise _Terminated(signum)

EXIT_USAGE = 2
EXIT_OS_ERROR = 1


def _print_json(obj: Any) -> None:
    """Print ``json.dumps(obj, indent=4, ensure_ascii=False)``."""
    _echo_parts(_json_parts(obj, _json_encoder()))


def _print_json_list(items: Iterable[Any]) -> None:
    """``_print_json(list(items))``, each item encoded as soon as it is made
    (a 65,536-snapshot listing need not hold 65,536 objects)."""
    _echo_parts(_json_list_parts(items, _json_encoder(), 0))


_JSON_INDENT = 4
#: List items encoded together (one call of the encoder for each batch)
_JSON_BATCH = 512


def _json_encoder() -> json.JSONEncoder:
    return json.JSONEncoder(indent=_JSON_INDENT, ensure_ascii=False)


def _json_parts(value: Any, encoder: json.JSONEncoder, depth: int = 0) -> Iterator[str]:
    """The text ``encoder.encode(value)`` in parts: the outer container and
    the lists in it are opened here, and list items are encoded a batch at
    a time.

    Encoded whole, a large listing costs far more memory than its text: the
    indenting encoder is pure Python and gathers every small piece of the
    text (~50 an object) in one list before joining them.  The parts join to
    exactly the encoder's text: the text of a value nested N levels deep is
    its own text with N indents after every newline (strings are written
    with escapes, never with a raw newline)."""
    pad = "\n" + " " * (_JSON_INDENT * depth)
    if depth < 2 and isinstance(value, (list, tuple)):
        yield from _json_list_parts(value, encoder, depth)
    elif depth == 0 and isinstance(value, dict) and value:
        opening = "{"
        for key, item in value.items():
            # the key as the encoder writes it (a string, number, bool or
            # null), cut from '{\n    KEY: null\n}'
            key_text = encoder.encode({key: None})[2 + _JSON_INDENT:-8]
            yield f"{opening}{pad}{' ' * _JSON_INDENT}{key_text}: "
            yield from _json_parts(item, encoder, depth + 1)
            opening = ","
        yield pad + "}"
    else:
        yield encoder.encode(value).replace("\n", pad)


def _json_list_parts(items: Iterable[Any], encoder: json.JSONEncoder, depth: int
                     ) -> Iterator[str]:
    """:func:`_json_parts` of a list, for any iterable of its items."""
    pad = "\n" + " " * (_JSON_INDENT * depth)
    inner = pad + " " * _JSON_INDENT
    opening = "[" + inner
    rest = iter(items)
    while batch := list(itertools.islice(rest, _JSON_BATCH)):
        texts = [text for item in batch if (text := _flat_object_text(item, inner)) is not None]
        if len(texts) == len(batch):
            yield opening + ("," + inner).join(texts)
        else:
            # the batch's text is '[\n    ITEM,\n    ITEM\n]': keep the items
            yield opening + encoder.encode(batch)[2 + _JSON_INDENT:-2].replace("\n", pad)
        opening = "," + inner
    yield "[]" if opening[0] == "[" else pad + "]"


def _flat_object_text(obj: Any, pad: str) -> str | None:
    """The indenting encoder's text of a dict of string keys and string,
    integer, boolean or null values, starting a line that ``pad`` starts
    (the objects of a listing: the encoder is pure Python and costs ~5x
    this), or ``None`` for anything else."""
    if type(obj) is not dict or not obj:
        return None
    inner = pad + " " * _JSON_INDENT
    quote = json.encoder.encode_basestring  # what the encoder uses with ensure_ascii=False
    lines = []
    for key, value in obj.items():
        kind = type(value)
        if type(key) is not str:
            return None
        if kind is str:
            text = quote(value)
        elif value is None:
            text = "null"
        elif value is True:
            text = "true"
        elif value is False:
            text = "false"
        elif kind is int:
            text = int.__repr__(value)
        else:
            return None
        lines.append(f"{quote(key)}: {text}")
    return "{" + inner + ("," + inner).join(lines) + pad + "}"


def _echo_parts(parts: Iterable[str]) -> None:
    """``click.echo`` of the joined parts, written once all are made (as the
    whole text would be: an error on the way prints nothing), joined in
    pieces of ~64 KiB meanwhile."""
    pieces: list[str] = []
    batch: list[str] = []
    size = 0
    for part in parts:
        batch.append(part)
        size += len(part)
        if size >= 1 << 16:
            pieces.append("".join(batch))
            batch.clear()
            size = 0
    pieces.append("".join(batch))
    for piece in pieces[:-1]:
        click.echo(piece, nl=False)
    click.echo(pieces[-1])


def _one_line(message: str) -> str:
    """An error or warning as one terminal-safe line (messages may quote
    names from the image)."""
    return describe.escape_controls(" ".join(str(message).split("\n")))


def _echo_text(text: str) -> None:
    """Text output for people: names from the image may hold terminal
    control sequences, which are shown escaped (JSON output is exact)."""
    click.echo(describe.escape_controls(text))


class _Group(click.Group):
    """Maps library errors to one stderr line and a stable exit status."""

    def invoke(self, ctx: click.Context) -> Any:
        debug = bool(ctx.params.get("debug"))
        with warnings.catch_warnings():
            warnings.simplefilter("always", ImageInUseWarning)
            warnings.showwarning = _show_warning
            try:
                return super().invoke(ctx)
            except Qcow2Error as exc:
                if debug:
                    traceback.print_exc()
                click.echo(f"qcow2snap: error: {_one_line(str(exc))}", err=True)
                ctx.exit(exc.exit_code)
            except ValueError as exc:
                if debug:
                    traceback.print_exc()
                click.echo(f"qcow2snap: error: {_one_line(str(exc))}", err=True)
                ctx.exit(EXIT_USAGE)
            except BrokenPipeError:
                raise  # stdout's reader left: click ends quietly (exit 1)
            except OSError as exc:
                if debug:
                    traceback.print_exc()
                name = f": {exc.filename}" if exc.filename else ""
                click.echo(f"qcow2snap: error: {_one_line(f'{exc.strerror or exc}{name}')}",
                           err=True)
                ctx.exit(EXIT_OS_ERROR)
            except KeyboardInterrupt:
                click.echo("qcow2snap: interrupted", err=True)
                ctx.exit(130)
            except _Terminated as exc:
                click.echo(f"qcow2snap: terminated by {signal.Signals(exc.signum).name}",
                           err=True)
                ctx.exit(128 + exc.signum)


def _show_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                  file: Any = None, line: str | None = None) -> None:
    click.echo(f"qcow2snap: warning: {_one_line(str(message))}", err=True)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="qcow2snap")
@click.option("--debug", is_flag=True, help="Show a traceback on errors.")
def cli(debug: bool) -> None:
    """Inspect and edit internal snapshots of stopped qcow2 images.

    Reading commands never modify the image. SNAPSHOT arguments match a
    snapshot ID or name; use --by-id / --by-name when that is ambiguous.
    """


ALLOW_DIR_ENVVAR = "QCOW2SNAP_ALLOW_DIR"

_image_options = [
    click.option("--backing-file", "backing_file", type=click.Path(dir_okay=False),
                 help="Path of the backing file (overrides the one named in the image)."),
    click.option("--no-backing", is_flag=True,
                 help="Read unallocated clusters as zeros instead of from the backing file."),
    click.option("--data-file", type=click.Path(dir_okay=False),
                 help="Path of the external data file (overrides the one named in the image)."),
    click.option("--allow-dir", "allow_dirs", multiple=True, metavar="DIR",
                 type=click.Path(file_okay=False), envvar=ALLOW_DIR_ENVVAR,
                 help="Also follow backing and data files that the image names in DIR "
                      "(repeatable; or a list in $" + ALLOW_DIR_ENVVAR + ", separated by ':'). "
                      "By default only files in the image's own directory are followed."),
]


def image_options(func: F) -> F:
    for option in reversed(_image_options):
        func = option(func)
    return func


@contextmanager
def _open(path: str, backing_file: str | None = None, no_backing: bool = False,
          data_file: str | None = None, allow_dirs: tuple[str, ...] = ()
          ) -> Iterator[Qcow2Image]:
    backing: str | bool | None = False if no_backing else backing_file
    with open_image(path, backing_file=backing, data_file=data_file,
                    allow_dirs=allow_dirs) as image:
        yield image


@cli.command()
@click.argument("image", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print JSON (qemu-img info's keys and more).")
@image_options
def info(image: str, as_json: bool, backing_file: str | None, no_backing: bool,
         data_file: str | None, allow_dirs: tuple[str, ...]) -> None:
    """Show an image's header, features, snapshots and backing chain (each
    link resolved, and which are not followed, and why)."""
    with _open(image, backing_file, no_backing, data_file, allow_dirs) as img:
        if as_json:
            _print_json(describe.image_info_json(img, image))
        else:
            _echo_text(describe.info_text(img, image))


@cli.command(name="list")
@click.argument("images", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def list_(images: tuple[str, ...], as_json: bool) -> None:
    """List the snapshots of one image, or compare those of a VM's disks.

    With one IMAGE: a table like `qemu-img snapshot -l` (plus DISK_SIZE);
    --json prints an array of snapshot objects. With several IMAGES: the
    snapshots present on all of them, and which are missing where.
    """
    if len(images) == 1:
        with open_image(images[0]) as img:
            if as_json:
                _print_json_list(describe.snapshot_json(s, img) for s in img.snapshots)
            elif img.snapshots:
                _echo_text("Snapshot list:\n"
                           + describe.snapshot_table_text(img.snapshots, image=img))
        return
    opened: list[tuple[str, list[dict[str, Any]], list[Any]]] = []
    for path in images:
        with open_image(path) as img:
            opened.append((path, [describe.snapshot_json(s, img) for s in img.snapshots],
                           list(img.snapshots)))
    common, partial = describe.compare_snapshot_sets(
        [(path, [o["name"] for o in objs]) for path, objs, _ in opened])
    if as_json:
        _print_json({
            "images": [{"filename": path, "snapshots": objs} for path, objs, _ in opened],
            "common": common,
            "partial": partial,
        })
        return
    first_path, _, first_snaps = opened[0]
    if common:
        click.echo(f"Snapshots present on all {len(images)} images:")
        rows = [s for s in first_snaps if s.name in common]
        seen: set[str] = set()
        unique = []
        for s in rows:
            if s.name not in seen:
                seen.add(s.name)
                unique.append(s)
        _echo_text(describe.snapshot_table_text(unique, show_id=False))
    else:
        click.echo(f"No snapshot is present on all {len(images)} images.")
    if partial:
        click.echo("")
        click.echo("Snapshots missing on some images:")
        for entry in partial:
            _echo_text(f"  {entry['name']}: present on {', '.join(entry['present'])}; "
                       f"missing on {', '.join(entry['missing'])}")


def _snapshot_ref(image: Qcow2Image, ref: str, by_id: bool, by_name: bool) -> Any:
    if by_id and by_name:
        raise click.UsageError("--by-id and --by-name exclude each other")
    by: Literal["id", "name"] | None = "id" if by_id else "name" if by_name else None
    return image.find_snapshot(ref, by=by)


_snapshot_selection = [
    click.option("--by-id", is_flag=True, help="SNAPSHOT is an ID (never a name)."),
    click.option("--by-name", is_flag=True, help="SNAPSHOT is a name (never an ID)."),
]


def snapshot_selection(func: F) -> F:
    for option in reversed(_snapshot_selection):
        func = option(func)
    return func


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


_progress_option = click.option(
    "--progress/--no-progress", default=None,
    help="Show a progress bar (default: when stderr is a terminal).")


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
        active = snapshot == "-" and not (by_id or by_name)
        ref = None if active else _snapshot_ref(img, snapshot, by_id, by_name)
        label = "active layer" if ref is None else f"snapshot {ref.id} ({ref.name})"
        with _progress_bar(progress, f"extract {label}") as callback:
            result = do_extract(img, ref, output, format=out_format,  # type: ignore[arg-type]
                                compress=compression, progress=callback, overwrite=force,  # type: ignore[arg-type]
                                backing=not no_backing)
    if as_json:
        _print_json({"output": result.output, "format": result.format,
                     "virtual-size": result.virtual_size, "bytes-written": result.bytes_written,
                     "snapshot": None if result.snapshot is None else result.snapshot.id})


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
        ref = _snapshot_ref(img, snapshot, by_id, by_name)
        with _progress_bar(progress, f"vmstate {ref.id} ({ref.name})") as callback:
            result = dump_vm_state(img, ref, output, progress=callback, overwrite=force)
    if as_json:
        _print_json({"output": result.output, "vm-state-size": result.virtual_size,
                     "snapshot": ref.id})


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
        ref = _snapshot_ref(img, snapshot, by_id, by_name)
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
@click.option("--format", "out_format", type=click.Choice(["raw", "elf"]), default="raw",
              show_default=True,
              help="raw: guest-physical image (file offset = address); elf: ELF core like "
                   "QEMU's dump-guest-memory.")
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

    Zero pages become holes (the output is sparse). raw and elf need an x86
    pc or q35 machine; --block works for any machine.
    """
    from .ops.memory import export_memory
    if block is not None and out_format != "raw":
        raise click.UsageError("--block writes the block as it is; it excludes --format elf")
    below = _size_option(max_ram_below_4g)
    with _open(image, backing_file, no_backing, data_file, allow_dirs) as img:
        ref = _snapshot_ref(img, snapshot, by_id, by_name)
        with _progress_bar(progress, f"memory {ref.id} ({ref.name})") as callback:
            result = export_memory(img, ref, output, format=out_format,  # type: ignore[arg-type]
                                   block=block, max_ram_below_4g=below, progress=callback,
                                   overwrite=force)
    if as_json:
        _print_json(describe.memory_result_json(result))


def _edit_report(results: list[Any], as_json: bool, dry_run: bool) -> None:
    """Print one line (or one JSON object) per image; exit non-zero if any failed."""
    objs = []
    exit_codes: list[int] = []
    for r in results:
        obj: dict[str, Any] = {"filename": r.path, "operation": r.operation,
                               "snapshot-id": r.snapshot_id, "snapshot-name": r.snapshot_name,
                               "ok": r.ok, "dry-run": dry_run}
        if r.commit is not None:
            c = r.commit
            obj.update({
                "clusters-allocated": len(c.clusters_allocated),
                "clusters-freed": len(c.clusters_freed),
                "bytes-allocated": c.bytes_allocated,
                "bytes-freed": c.bytes_freed,
                "metadata-bytes-written": c.metadata_bytes_written,
                "file-size-before": c.file_size_before,
                "file-size-after": c.file_size_after,
                "header-changes": {k: {"before": v[0], "after": v[1]}
                                   for k, v in c.header_changes.items()},
            })
        if r.error is not None:
            exit_codes.append(getattr(r.error, "exit_code", 1))
            obj["error"] = _one_line(str(r.error))
        objs.append(obj)
        if as_json:
            continue
        if r.error is not None:
            click.echo(f"qcow2snap: error: {_one_line(str(r.error))}", err=True)
            continue
        verb = {"create": "created", "delete": "deleted", "revert": "reverted to",
                "rename": "renamed"}[r.operation]
        if dry_run:
            verb = "would " + {"create": "create", "delete": "delete",
                               "revert": "revert to", "rename": "rename"}[r.operation]
        c = r.commit
        line = f"{r.path}: {verb} snapshot {r.snapshot_id} ({r.snapshot_name})"
        if c is not None:
            line += (f"; {len(c.clusters_allocated)} cluster(s) allocated, "
                     f"{len(c.clusters_freed)} freed ({describe.size_to_str(c.bytes_freed)} "
                     f"reclaimed), file {describe.size_to_str(c.file_size_before)} -> "
                     f"{describe.size_to_str(c.file_size_after)}")
        _echo_text(line)
        if c is not None and c.reclaim_error:
            click.echo(f"qcow2snap: warning: {r.path}: {_one_line(c.reclaim_error)}", err=True)
        if dry_run and c is not None:
            for field_name, (before, after) in c.header_changes.items():
                click.echo(f"    header {field_name}: {before:#x} -> {after:#x}")
    if as_json:
        _print_json(objs)
    if exit_codes:
        # the error's own status when every failure agrees, else 1
        raise SystemExit(exit_codes[0] if len(set(exit_codes)) == 1 else 1)


_edit_options = [
    click.option("--dry-run", is_flag=True,
                 help="Show the planned changes (clusters to allocate and free, bytes "
                      "reclaimed, header fields) and write nothing."),
    click.option("--json", "as_json", is_flag=True, help="Print the results as JSON."),
]


def edit_options(func: F) -> F:
    for option in reversed(_edit_options):
        func = option(func)
    return func


def _by(by_id: bool, by_name: bool) -> Any:
    if by_id and by_name:
        raise click.UsageError("--by-id and --by-name exclude each other")
    return "id" if by_id else "name" if by_name else None


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
    from .errors import ImageInUseError
    from .ops.check import CheckFailedError
    from .ops.repair import check_or_repair
    if dry_run and repair is None:
        raise click.UsageError("--dry-run needs --repair leaks or --repair all")
    try:
        with _progress_bar(progress, "check") as callback:
            report = check_or_repair(image, repair, dry_run=dry_run,  # type: ignore[arg-type]
                                     progress=callback)
    except ImageInUseError as exc:
        raise CheckFailedError(f"{exc} (repair refused)") from exc
    except Qcow2Error as exc:
        raise CheckFailedError(f"Could not check {image!r}: {exc}") from exc
    if as_json:
        _print_json(describe.check_json(report))
    else:
        _echo_text(describe.check_text(report))
    raise SystemExit(report.exit_code)


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point."""
    from .copier import prefer_heap_reuse
    prefer_heap_reuse()  # this process is ours: tune the allocator for bulk copies
    for signum in (signal.SIGTERM, signal.SIGHUP):  # clean up as Ctrl-C does
        if signal.getsignal(signum) is not signal.SIG_IGN:  # nohup's ignored SIGHUP stays so
            signal.signal(signum, _terminate)
    cli.main(args=argv, prog_name="qcow2snap")


if __name__ == "__main__":  # pragma: no cover
    main(sys.argv[1:])
