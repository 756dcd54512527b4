#!/bin/sh
# Set up qcow2snap in ./.venv and run its main job on a bundled fixture:
# list the snapshots of a VM image, show one, and read one back out.
set -eu
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -e . >/dev/null
WORK=$(mktemp -d "${TMPDIR:-/tmp}/qcow2snap-demo.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
IMAGE="$WORK/savevm.qcow2"
.venv/bin/python -c "import gzip,shutil,sys; shutil.copyfileobj(gzip.open(sys.argv[1]), open(sys.argv[2],'wb'))" \
    fixtures/savevm.qcow2.gz "$IMAGE"
Q=.venv/bin/qcow2snap
set -x
$Q list "$IMAGE"
$Q info "$IMAGE"
$Q extract --by-name run "$IMAGE" -o "$WORK/run.raw"
$Q vmstate dump --by-name run "$IMAGE" -o "$WORK/run.vmstate"
$Q vmstate info --by-name run "$IMAGE"
$Q check "$IMAGE"
set +x
echo "snapshot 'run' disk:    $(sha256sum "$WORK/run.raw" | cut -d' ' -f1)"
echo "snapshot 'run' vmstate: $(head -c 4 "$WORK/run.vmstate") stream, $(wc -c < "$WORK/run.vmstate") bytes"
