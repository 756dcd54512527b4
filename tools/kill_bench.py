#!/usr/bin/env python3
"""SIGKILL campaign: qemu-img snapshot against qcow2snap, same image, same kills.

For each operation (create, delete, revert) and each tool, the operation is
first run to completion on a copy (timed, watching the file for its first
and last write), then run again on fresh copies and killed with SIGKILL:

* ``anywhere``: at a seeded uniform moment of the whole run;
* ``writing``:  a seeded uniform delay after the tool's first write to the
  file is seen, within the span its writes took (so a tool whose writes are
  a small part of its run is not favoured).

After each kill ``qemu-img check --output=json`` classifies the image
(clean / leaks only / corruption or check errors), and the state is
compared with the old and the new one (snapshot list without dates, the
active layer's ``qemu-img map`` and the bytes it maps).

    python tools/kill_bench.py                  # 30 kills per tool, op and mode
    python tools/kill_bench.py --kills 10 --ops revert --modes writing

This is a measurement, not a test: nothing here runs in CI.  The image is
the one tests/test_sigkill.py uses (512-byte clusters, 512 MiB disk, 24 MiB
written at once and 3000 scattered small writes around three snapshots).
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import signal
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

QEMU_IMG = shutil.which("qemu-img") or "qemu-img"
QEMU_IO = shutil.which("qemu-io") or "qemu-io"
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import killsim  # the image and kill loop tests/test_sigkill.py uses

COMMANDS: dict[str, dict[str, list[str]]] = {
    "qemu-img": {
        "create": [QEMU_IMG, "snapshot", "-c", "killed-new"],
        "delete": [QEMU_IMG, "snapshot", "-d", "s1"],
        "revert": [QEMU_IMG, "snapshot", "-a", "s0"],
    },
    "qcow2snap": {
        "create": [sys.executable, "-m", "qcow2snap", "create", "killed-new"],
        "delete": [sys.executable, "-m", "qcow2snap", "delete", "--by-name", "s1"],
        "revert": [sys.executable, "-m", "qcow2snap", "revert", "--by-name", "s0"],
    },
}


def check(path: Path) -> tuple[str, dict[str, Any]]:
    proc = subprocess.run([QEMU_IMG, "check", "--output=json", str(path)],
                          check=False, capture_output=True, text=True)
    try:
        report = json.loads(proc.stdout)
    except json.JSONDecodeError:
        return "unreadable", {"stderr": proc.stderr.strip()}
    if report.get("corruptions") or report.get("check-errors"):
        return "corrupt", report
    if report.get("leaks"):
        return "leaks", report
    return ("clean" if proc.returncode == 0 else f"exit-{proc.returncode}"), report


def observe(path: Path) -> tuple[Any, ...] | None:
    try:
        return killsim.observe(QEMU_IMG, path)
    except subprocess.CalledProcessError:  # qemu-img cannot even read it
        return None


def timed_run(command: list[str], base: Path, path: Path) -> tuple[float, float, float]:
    first, last, duration, status, stderr = killsim.timed_run(command, base, path)
    if status != 0:
        raise SystemExit(f"{command} failed: {stderr}")
    return first, last, duration


def kill_run(command: list[str], path: Path, delay: float | None, after_write: float) -> int:
    return killsim.kill_run(command, path, delay, after_write)[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=30)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--ops", nargs="+", default=["create", "delete", "revert"])
    parser.add_argument("--tools", nargs="+", default=["qemu-img", "qcow2snap"])
    parser.add_argument("--modes", nargs="+", default=["anywhere", "writing"])
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--json", action="store_true", help="also print the results as JSON")
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="kill_bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    base = workdir / "base.qcow2"
    if not base.exists():
        print(f"building {base} ...", flush=True)
        killsim.build_image(base, QEMU_IMG, QEMU_IO)
    old = observe(base)
    work = workdir / "work.qcow2"
    results: list[dict[str, Any]] = []
    print(f"{'tool':10} {'op':7} {'mode':9} {'run s':>6} {'kills':>5} {'killed':>6}  "
          f"{'clean':>5} {'leaks':>5} {'corrupt':>7} {'other':>5}  states", flush=True)
    for op in args.ops:
        for tool in args.tools:
            command = COMMANDS[tool][op]
            timings = sorted(timed_run(command, base, work) for _ in range(3))
            first, last, duration = timings[1]
            if check(work)[0] != "clean":
                raise SystemExit(f"{tool} {op}: the completed run is not clean")
            new = observe(work)
            window = max(0.002, last - first) * 1.2
            for mode in args.modes:
                rng = random.Random(f"{args.seed}-{tool}-{op}-{mode}")
                verdicts: Counter[str] = Counter()
                states: Counter[str] = Counter()
                killed = 0
                examples: list[str] = []
                for _ in range(args.kills):
                    shutil.copyfile(base, work)
                    if mode == "anywhere":
                        status = kill_run(command, work, rng.uniform(0, duration), 0.0)
                    else:
                        status = kill_run(command, work, None, rng.uniform(0, window))
                    killed += status == -signal.SIGKILL
                    verdict, report = check(work)
                    verdicts[verdict] += 1
                    state = observe(work)
                    states["old" if state == old else "new" if state == new else "neither"] += 1
                    if verdict == "corrupt" and len(examples) < 2:
                        examples.append(json.dumps({k: report.get(k) for k in (
                            "corruptions", "leaks", "check-errors")}))
                other = args.kills - sum(verdicts[v] for v in ("clean", "leaks", "corrupt"))
                print(f"{tool:10} {op:7} {mode:9} {duration:6.2f} {args.kills:5} {killed:6}  "
                      f"{verdicts['clean']:5} {verdicts['leaks']:5} {verdicts['corrupt']:7} "
                      f"{other:5}  {dict(states)}", flush=True)
                for example in examples:
                    print(f"{'':10} e.g. {example}")
                results.append({"tool": tool, "op": op, "mode": mode, "duration": duration,
                                "writes": [first, last], "kills": args.kills,
                                "killed": killed, "verdicts": dict(verdicts),
                                "states": dict(states)})
    if args.json:
        print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
