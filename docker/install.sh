#!/bin/sh
# Install the pinned set into a virtual environment (docker/Dockerfile and docker/Dockerfile.cuda;
# docker/Dockerfile.jetson installs into the base image's Python). Same order as the Makefile:
# torch/torchvision, ultralytics --no-deps (it would pull the GUI opencv-python), requirements.txt
# (headless OpenCV), then this package --no-deps.
#
#   install.sh deps VENV REQUIREMENTS   torch, ultralytics and requirements.txt (a cacheable layer)
#   install.sh package VENV SRC         this package (SRC: pyproject.toml + packages, or its wheel)
#     VENV "system": the image's own python3 environment (Jetson: torch lives there)
#   environment:
#     WHEELHOUSE       folder of wheels (docker/wheelhouse.sh); set: offline, nothing is downloaded
#     TORCH_INDEX_URL  online builds: where torch/torchvision come from (CPU image: the CPU wheel index)
#     PIP_INDEX_URL    online builds: everything else (pip's own variable; PyPI by default)
#     TORCH_SPEC       default "torch==2.14.1 torchvision==0.29.1"
#     ULTRALYTICS_SPEC default "ultralytics==8.4.190"
#     SKIP_TORCH       set: torch/torchvision are already there (Jetson base images)
set -eu
phase=$1
venv=$2
src=$3
TORCH_SPEC=${TORCH_SPEC:-"torch==2.14.1 torchvision==0.29.1"}
ULTRALYTICS_SPEC=${ULTRALYTICS_SPEC:-"ultralytics==8.4.190"}
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1

if [ "$venv" = system ]; then
    py=python3
    export PIP_BREAK_SYSTEM_PACKAGES=1  # Ubuntu 24.04 bases mark their Python externally managed
else
    [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
    py=$venv/bin/python
fi
pip="$py -m pip install"
if [ -n "${WHEELHOUSE:-}" ]; then
    if ! ls "$WHEELHOUSE"/*.whl >/dev/null 2>&1; then
        echo "install.sh: WHEELHOUSE=$WHEELHOUSE holds no wheels (run docker/wheelhouse.sh first)" >&2
        exit 1
    fi
    echo "install.sh: $phase, offline from $WHEELHOUSE"
    offline="--no-index --find-links $WHEELHOUSE"
    torch_source=$offline
else
    offline=""
    torch_source=""
    # PyPI stays a source for torch's own dependencies (sympy, filelock, ...).
    [ -n "${TORCH_INDEX_URL:-}" ] && \
        torch_source="--index-url $TORCH_INDEX_URL --extra-index-url ${PIP_INDEX_URL:-https://pypi.org/simple}"
fi

if [ "$phase" = package ]; then
    # shellcheck disable=SC2086
    $pip $offline --no-deps "$src"
    CASC_SRC=$src "$py" -I - <<'PY'
import os
from pathlib import Path
import detector, service
static = Path(service.__file__).parent / "static"
# The web page's files are package data: without them the service cannot start (create_app mounts it).
assert not ((Path(os.environ["CASC_SRC"]) / "service/static").is_dir() and not static.is_dir()), (
    f"{static} is missing from the installed package: pyproject.toml needs "
    "[tool.setuptools.package-data] service = [\"static/*\"]")
print("install.sh: casc-detector", detector.__file__)
PY
    exit 0
fi
[ "$phase" = deps ] || { echo "install.sh: phase must be deps or package" >&2; exit 2; }
if [ -z "${SKIP_TORCH:-}" ]; then
    # shellcheck disable=SC2086
    $pip $torch_source $TORCH_SPEC
fi
# shellcheck disable=SC2086
$pip $offline --no-deps $ULTRALYTICS_SPEC
# shellcheck disable=SC2086
$pip $offline -r "$src"
"$py" -I - <<'PY'
import importlib.metadata as md
import cv2, torch, torchvision  # noqa: F401  (the image must import them)
names = {d.metadata["Name"].lower() for d in md.distributions()}
assert "opencv-python" not in names, "the GUI opencv-python got installed; only the headless build belongs here"
print(f"install.sh: torch {torch.__version__}, torchvision {torchvision.__version__}, "
      f"ultralytics {md.version('ultralytics')}, opencv {cv2.__version__}")
PY
