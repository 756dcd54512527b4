#!/usr/bin/env python3
"""Benchmark extraction of an encrypted snapshot: ``qcow2snap extract``
against ``qemu-img convert --object secret,... --image-opts ... -O raw`` of
the same snapshot of the same image, paired A/B by ``farm-bench`` in one
run (median ratios).

Images (made once in --dir with qemu-img/qemu-io, kept): 1 GiB virtual,
512 MiB of random data in 8 runs of 64 MiB, then the snapshot ``bench`` and
16 MiB rewritten; one per encryption setup: LUKS with QEMU's defaults
(aes-256-xts-plain64, sha256), LUKS aes-256-cbc-essiv:sha256, and the
legacy ``encrypt.format=aes`` (AES-128-CBC).  PBKDF2 runs with
``iter-time=100`` (QEMU's default of 2 s would time PBKDF2, not decryption;
both tools pay it alike).  The outputs are checked equal (``cmp``) first.

    python tools/bench_luks.py --runs 7
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
from pathlib import Path

MiB = 1 << 20
VIRTUAL = 1024 * MiB
SECRET = "bench-passphrase"

SETUPS = {
    "luks-xts-plain64": "encrypt.format=luks,encrypt.iter-time=100",
    "luks-cbc-essiv": ("encrypt.format=luks,encrypt.iter-time=100,encrypt.cipher-alg=aes-256,"
                       "encrypt.cipher-mode=cbc,encrypt.ivgen-alg=essiv,"
                       "encrypt.ivgen-hash-alg=sha256"),
    "aes-legacy": "encrypt.format=aes",
}


def secret_args(pw: Path) -> list[str]:
    return ["--object", f"secret,id=s,file={pw}"]


def image_opts(image: Path) -> str:
    return f"driver=qcow2,file.filename={image},encrypt.key-secret=s"


def make_image(work: Path, name: str, options: str, pw: Path) -> Path:
    image = work / f"{name}.qcow2"
    if image.exists():
        return image
    tmp = work / f"{name}.tmp.qcow2"
    rand = work / "random.src"
    if not rand.exists():
        rand.write_bytes(os.urandom(64 * MiB))
    for _ in range(10):   # QEMU's PBKDF2 timing fails now and then on coarse CPU clocks
        made = subprocess.run(["qemu-img", "create", "-q", *secret_args(pw), "-f", "qcow2",
                               "-o", f"{options},encrypt.key-secret=s", str(tmp), str(VIRTUAL)],
                              capture_output=True, text=True)
        if made.returncode == 0:
            break
    else:
        sys.exit(f"qemu-img create failed: {made.stderr}")
    step = VIRTUAL // 8
    writes = [a for i in range(8) for a in ("-c", f"write -q -s {rand} {i * step} {64 * MiB}")]
    subprocess.run(["qemu-io", *secret_args(pw), "--image-opts", *writes, image_opts(tmp)],
                   check=True)
    subprocess.run(["qemu-img", "snapshot", *secret_args(pw), "--image-opts", "-c", "bench",
                    image_opts(tmp)], check=True)
    subprocess.run(["qemu-io", *secret_args(pw), "--image-opts", "-c",
                    f"write -q -P 0x11 0 {16 * MiB}", image_opts(tmp)], check=True)
    tmp.rename(image)
    return image


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=Path("/var/tmp/qcow2snap-bench-luks"))
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--out-dir", type=Path, default=Path("/dev/shm"),
                        help="where both outputs go (default tmpfs: the disk's writeback "
                             "would time the filesystem, not decryption)")
    parser.add_argument("--setup", choices=list(SETUPS), action="append",
                        help="only these setups (repeatable; default: all)")
    args = parser.parse_args()
    work: Path = args.dir
    work.mkdir(parents=True, exist_ok=True)
    pw = work / "pw"
    pw.write_text(SECRET)
    ours_out = args.out_dir / "bench-luks-ours.raw"
    theirs_out = args.out_dir / "bench-luks-theirs.raw"
    qcow2snap = [sys.executable, "-m", "qcow2snap"]
    for name in args.setup or list(SETUPS):
        image = make_image(work, name, SETUPS[name], pw)
        a = [*qcow2snap, "extract", "--no-progress", "-f", "bench", str(image), "-o",
             str(ours_out), "--passphrase-file", str(pw)]
        b = ["qemu-img", "convert", *secret_args(pw), "--image-opts", image_opts(image),
             "-l", "snapshot.name=bench", "-O", "raw", str(theirs_out)]
        subprocess.run(a, check=True)
        subprocess.run(b, check=True)
        subprocess.run(["cmp", str(ours_out), str(theirs_out)], check=True)
        print(f"## {name}: outputs equal\nA: {shlex.join(a)}\nB: {shlex.join(b)}", flush=True)
        subprocess.run(["farm-bench", "-n", str(args.runs), "--timeout", "900",
                        "--vs", shlex.join(b), "--", *a], check=False)
    for out in (ours_out, theirs_out):
        out.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
