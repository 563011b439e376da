#!/usr/bin/env bash
# gpu_wheels.sh: fetch into .whl/ the wheels that the lent GPU machine's image lacks.
#
# The lent machine (one H200) has Python 3.12 with torch, numpy, pandas, matplotlib, pyyaml, tqdm,
# filelock, psutil, pytest and more, but no MLflow, Optuna, pydantic or SQLAlchemy, and it cannot
# download anything. This script downloads, here, the wheels of the missing packages for CPython
# 3.12 on manylinux x86_64, at the versions installed in .venv (`make setup`), so that they travel
# with the working tree (carry [".whl"]) and get installed there without an index:
#
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
#       --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
#
# after which `python3 -m pipeline tune|train ...`, `python3 -m benchmarks.time_to_quality ...` and
# `python3 -m pytest tests/test_training.py ...` run there. .whl/ is kept out of git through
# .git/info/exclude. Wheels left from an older list or version are removed; the total must stay
# under 55 MiB (what a run carries is 64 MiB in all).
#
# Usage: benchmarks/gpu_wheels.sh          (from anywhere; needs .venv, network to the index)
#        benchmarks/gpu_wheels.sh --help   (this text)
# Env:   PYTHON (default python3) runs `pip download`; VENV (default .venv) gives the versions.
set -euo pipefail

if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
    sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"
    exit 0
fi
if [[ $# -gt 0 ]]; then
    echo "gpu_wheels.sh: unknown argument '$1' (see --help)" >&2
    exit 2
fi

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
DEST=.whl
LIMIT_MIB=55

# What the GPU image lacks, found by running the commands above in a copy of that image (Python
# 3.12, no MLflow, Optuna, pydantic, SQLAlchemy); everything else they import is in the image.
# - mlflow, the full wheel: pipeline/logged_models.py asks importlib.metadata for the "mlflow"
#   version, which only the full wheel's metadata gives; the wheel holds every file of
#   mlflow-skinny and mlflow-tracing too (identical), so those two are left out.
# - imported by `import mlflow` itself: fastapi, starlette, annotated-doc (mlflow.gateway),
#   databricks-sdk (find_spec("databricks.agents") fails without the "databricks" package),
#   cachetools, sqlparse, importlib-metadata, opentelemetry-*, pydantic and its deps (which
#   pipeline/config.py imports too);
#   cryptography and cffi by the SQLite model registry store (mlflow/store/model_registry/dbmodels).
# - the SQLite stores of MLflow and Optuna: sqlalchemy (2.1 needs no greenlet), alembic, mako.
# - tests/conftest.py imports tests/postgres.py, which imports pytest_postgresql (mirakuru,
#   port-for, psycopg); psycopg-binary brings libpq, which the image may not have.
# Not needed: python-dotenv (only the `mlflow` CLI), pycparser (cffi's cdef, unused at run time).
PACKAGES=(
    mlflow
    fastapi starlette annotated-doc databricks-sdk
    cachetools sqlparse importlib-metadata
    opentelemetry-api opentelemetry-sdk opentelemetry-proto opentelemetry-semantic-conventions
    pydantic pydantic-core annotated-types typing-inspection
    cryptography cffi
    sqlalchemy alembic mako
    optuna colorlog
    pytest-postgresql mirakuru port-for psycopg psycopg-binary
)

if [[ ! -x "$VENV/bin/python" ]]; then
    echo "gpu_wheels.sh: no $VENV/bin/python: run 'make setup' first (it gives the versions)" >&2
    exit 1
fi

# name==version for each package, as installed in the venv.
pins=$("$VENV/bin/python" - "${PACKAGES[@]}" <<'EOF'
import importlib.metadata as md
import sys

for name in sys.argv[1:]:
    try:
        print(f"{name}=={md.version(name)}")
    except md.PackageNotFoundError:
        sys.exit(f"gpu_wheels.sh: {name} is not installed in {sys.prefix}")
EOF
)
mapfile -t PINS <<<"$pins"

mkdir -p "$DEST"
exclude=$(git rev-parse --git-path info/exclude 2>/dev/null || true)
if [[ -n "$exclude" ]] && ! grep -qxF "/$DEST/" "$exclude" 2>/dev/null; then
    mkdir -p "$(dirname "$exclude")"
    echo "/$DEST/" >>"$exclude"
fi

PLATFORMS=()
for p in manylinux_2_28 manylinux_2_27 manylinux_2_17 manylinux2014 manylinux1; do
    PLATFORMS+=(--platform "${p}_x86_64")
done
for pin in "${PINS[@]}"; do
    echo "$pin"
    "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp "${PLATFORMS[@]}" -d "$DEST" "$pin" 2>&1 |
        { grep -v "is ignored: it is neither a file nor a directory" || true; }
done

# Drop wheels that are not of the list at these versions (an older pin, a package dropped), list
# the rest with their sizes, and fail if they are over the limit.
"$PYTHON" - "$DEST" "$LIMIT_MIB" "${PINS[@]}" <<'EOF'
import pathlib
import re
import sys

def norm(name):
    return re.sub(r"[-_.]+", "_", name).lower()

dest, limit_mib, pins = pathlib.Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
wanted = {(norm(n), v) for n, v in (pin.split("==") for pin in pins)}
found, total = set(), 0
for wheel in sorted(dest.glob("*.whl")):
    name, version = wheel.name.split("-")[:2]
    if (norm(name), version) in wanted:
        found.add((norm(name), version))
        total += wheel.stat().st_size
        print(f"{wheel.stat().st_size:>10}  {wheel}")
    else:
        print(f"removing {wheel.name} (not in the list)")
        wheel.unlink()
if missing := wanted - found:
    sys.exit(f"gpu_wheels.sh: no wheel for {sorted(missing)}")
print(f"{len(found)} wheels, {total / 2**20:.1f} MiB in all")
if total > limit_mib * 2**20:
    sys.exit(f"gpu_wheels.sh: {dest}/ is over {limit_mib} MiB")
EOF
