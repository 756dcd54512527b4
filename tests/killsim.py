"""Real-SIGKILL campaigns: the image, and running / killing a command on it.

Shared by ``tests/test_sigkill.py`` (qcow2snap only, asserted) and
``tools/kill_bench.py`` (qemu-img against qcow2snap, counted), so both kill
the same image the same way.  Standard library only.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

#: 512-byte clusters and a 512 MiB disk: large metadata, so an edit runs
#: for a few tenths of a second
CLUSTER = 512
DISK = 512 << 20


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), check=True, capture_output=True, text=True)


def build_image(path: Path, qemu_img: str, qemu_io: str) -> None:
    """24 MiB written in one run, then 3000 scattered small writes (a tenth
    of them zero writes) around three snapshots s0, s1, s2."""
    run(qemu_img, "create", "-q", "-f", "qcow2", "-o", f"cluster_size={CLUSTER}", str(path),
        str(DISK))
    run(qemu_io, "-t", "unsafe", "-c", "write -P 0x11 0 24M", str(path))
    rng = random.Random(4)
    for s in range(3):
        run(qemu_img, "snapshot", "-c", f"s{s}", str(path))
        commands = []
        for _ in range(1000):
            offset = rng.randrange(DISK // CLUSTER) * CLUSTER
            length = CLUSTER * rng.choice((1, 1, 1, 2, 8))
            if rng.random() < 0.1:
                commands += ["-c", f"write -z {offset} {length}"]
            else:
                commands += ["-c", f"write -P {rng.randrange(1, 255)} {offset} {length}"]
        run(qemu_io, "-t", "unsafe", *commands, str(path))


def observe(qemu_img: str, path: Path) -> tuple[Any, ...]:
    """The snapshot list (without creation dates), the header facts qemu-img
    shows, and the active layer: its map and the bytes at every host range
    the map points to."""
    info = json.loads(run(qemu_img, "info", "--output=json", str(path)).stdout)
    snapshots = tuple(tuple(sorted((k, v) for k, v in sn.items() if not k.startswith("date")))
                      for sn in info.get("snapshots", []))
    facts = (info["virtual-size"], info["cluster-size"], info.get("dirty-flag"),
             json.dumps(info.get("format-specific"), sort_keys=True))
    mapping = json.loads(run(qemu_img, "map", "--output=json", str(path)).stdout)
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for entry in mapping:
            h.update(json.dumps(entry, sort_keys=True).encode())
            if entry.get("data") and "offset" in entry:
                h.update(os.pread(f.fileno(), entry["length"], entry["offset"]))
    return snapshots, facts, h.hexdigest()


def signature(path: Path) -> tuple[int, int, int]:
    """Changes as soon as the file is written (mtime alone is coarse)."""
    st = path.stat()
    return st.st_mtime_ns, st.st_size, st.st_blocks


def timed_run(command: list[str], base: Path, path: Path) -> tuple[float, float, float, int, str]:
    """Run ``command + [path]`` to completion on a fresh copy of ``base``,
    watching the file: seconds from the start to its first write, to its
    last write, and to the exit; then the exit status and stderr."""
    shutil.copyfile(base, path)
    sig = signature(path)
    started = time.monotonic()
    proc = subprocess.Popen([*command, str(path)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    writes = []
    while proc.poll() is None:
        now = signature(path)
        if now != sig:
            writes.append(time.monotonic() - started)
            sig = now
        time.sleep(0.0002)
    duration = time.monotonic() - started
    stderr = proc.stderr.read().decode() if proc.stderr else ""
    writes = writes or [duration]
    return writes[0], writes[-1], duration, proc.returncode, stderr


def kill_run(command: list[str], path: Path, delay: float | None,
             after_write: float) -> tuple[int, str]:
    """Start ``command + [path]`` and SIGKILL it ``delay`` seconds after the
    start, or (``delay=None``) ``after_write`` seconds after its first write
    to the file is seen.  Returns the exit status and stderr."""
    sig = signature(path)
    started = time.monotonic()
    victim = subprocess.Popen([*command, str(path)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE)
    if delay is not None:
        time.sleep(max(0.0, started + delay - time.monotonic()))
    else:
        while victim.poll() is None and signature(path) == sig:
            time.sleep(0.0001)
        time.sleep(after_write)
    victim.send_signal(signal.SIGKILL)
    _, stderr = victim.communicate()
    return victim.returncode, stderr.decode()
