#!/bin/sh
# Set up qcow2snap with its test extra in ./.venv and run the whole test suite.
# Cross-checks against qemu-img/qemu-io skip when those are not installed,
# unless QCOW2SNAP_REQUIRE_QEMU=1 (as .ci/run sets), which makes them fail.
set -eu
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]' >/dev/null
exec .venv/bin/python -m pytest "$@"
