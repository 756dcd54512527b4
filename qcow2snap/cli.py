"""The ``qcow2snap`` command line (top layer).

Each command parses its arguments, calls one library function and renders
the result with :mod:`qcow2snap.describe`.  Errors are funnelled through
:class:`_Group`: every :class:`~qcow2snap.errors.Qcow2Error` and ``OSError``
becomes one line on stderr and the exit status of its class (``--debug``
shows the traceback instead).
"""

from __future__ import annotations

import json
import os
import sys
import traceback
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import click

from . import __version__
from . import describe
from .errors import Qcow2Error
from .image import ImageInUseWarning, Qcow2Image
from .image import open as open_image

F = TypeVar("F", bound=Callable[..., Any])

EXIT_USAGE = 2
EXIT_OS_ERROR = 1


def _print_json(obj: Any) -> None:
    click.echo(json.dumps(obj, indent=4, ensure_ascii=False))


def _one_line(message: str) -> str:
    return " ".join(str(message).split("\n"))


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
            except OSError as exc:
                if debug:
                    traceback.print_exc()
                name = f": {exc.filename}" if exc.filename else ""
                click.echo(f"qcow2snap: error: {exc.strerror or exc}{name}", err=True)
                ctx.exit(EXIT_OS_ERROR)
            except KeyboardInterrupt:
                click.echo("qcow2snap: interrupted", err=True)
                ctx.exit(130)


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


_image_options = [
    click.option("--backing-file", "backing_file", type=click.Path(dir_okay=False),
                 help="Path of the backing file (overrides the one named in the image)."),
    click.option("--no-backing", is_flag=True,
                 help="Read unallocated clusters as zeros instead of from the backing file."),
    click.option("--data-file", type=click.Path(dir_okay=False),
                 help="Path of the external data file (overrides the one named in the image)."),
]


def image_options(func: F) -> F:
    for option in reversed(_image_options):
        func = option(func)
    return func


@contextmanager
def _open(path: str, backing_file: str | None = None, no_backing: bool = False,
          data_file: str | None = None) -> Iterator[Qcow2Image]:
    backing: str | bool | None = False if no_backing else backing_file
    with open_image(path, backing_file=backing, data_file=data_file) as image:
        yield image


@cli.command()
@click.argument("image", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print JSON (qemu-img info's keys and more).")
@image_options
def info(image: str, as_json: bool, backing_file: str | None, no_backing: bool,
         data_file: str | None) -> None:
    """Show an image's header, features and snapshots."""
    with _open(image, backing_file, no_backing, data_file) as img:
        if as_json:
            _print_json(describe.image_info_json(img, image))
        else:
            click.echo(describe.info_text(img, image))


@cli.command(name="list")
@click.argument("images", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def list_(images: tuple[str, ...], as_json: bool) -> None:
    """List the snapshots of one image, or compare those of a VM's disks.

    With one IMAGE: a table like `qemu-img snapshot -l` (plus DISK_SIZE);
    --json prints an array of snapshot objects. With several IMAGES: the
    snapshots present on all of them, and which are missing where.
    """
    opened: list[tuple[str, Any]] = []
    for path in images:
        with open_image(path) as img:
            opened.append((path, [describe.snapshot_json(s, img) for s in img.snapshots],
                           list(img.snapshots)))
    if len(images) == 1:
        _, objs, snaps = opened[0]
        if as_json:
            _print_json(objs)
        elif snaps:
            click.echo("Snapshot list:")
            click.echo(describe.snapshot_table_text(snaps))
        return
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
        click.echo(describe.snapshot_table_text(unique, show_id=False))
    else:
        click.echo(f"No snapshot is present on all {len(images)} images.")
    if partial:
        click.echo("")
        click.echo("Snapshots missing on some images:")
        for entry in partial:
            click.echo(f"  {entry['name']}: present on {', '.join(entry['present'])}; "
                       f"missing on {', '.join(entry['missing'])}")


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point."""
    cli.main(args=argv, prog_name="qcow2snap")


if __name__ == "__main__":  # pragma: no cover
    main(sys.argv[1:])
