#!/usr/bin/env bash
# The Python package's CI: a virtual environment, the package installed with the README's one
# command, the command line for the bit-equality tests, then pytest.
# Usage: bash crates/t2v-py/ci.sh [pytest arguments]   (from anywhere; T2V_PY_VENV picks the venv)
set -euo pipefail
cd "$(dirname "$0")/../.."

venv="$(realpath -m "${T2V_PY_VENV:-target/py-venv}")"
bash .ci/venv "$venv"
"$venv/bin/python" -m pip install -q --disable-pip-version-check pytest numpy safetensors pillow

start=$SECONDS
# The README's install command (maturin comes in through the build's isolated environment). It
# builds with the workspace's dev profile (pyproject.toml) in cargo's target folder, so what
# `cargo test` compiled is reused.
"$venv/bin/python" -m pip install -q --disable-pip-version-check ./crates/t2v-py
echo "t2v-py: built and installed in $((SECONDS - start)) s"
# .ci/run builds the package first and tests it last (T2V_PY_BUILD_ONLY=1 stops here).
[ "${T2V_PY_BUILD_ONLY:-}" = 1 ] && exit 0

cargo build -q -p t2v-cli
# Where cargo put it: CARGO_TARGET_DIR when set (CI's shared cache folder), else target/.
export T2V_BIN="${CARGO_TARGET_DIR:-$PWD/target}/debug/t2v"
# Run from the tests' folder so that `import t2v` finds the installed package, not the sources.
cd crates/t2v-py/tests
"$venv/bin/python" -m pytest -q "$@"
