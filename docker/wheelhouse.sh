#!/usr/bin/env bash
# Prepare wheelhouse/ (gitignored) with exactly the pinned install set, for offline / air-gapped
# image builds (`docker build --build-arg WHEELHOUSE=wheelhouse ...`, see docker/README.md).
#
#   docker/wheelhouse.sh                 # wheels for this machine's Python/platform (x86_64, cp311 here)
#   WHEELHOUSE=/path docker/wheelhouse.sh
#   PIP_PLATFORM=manylinux_2_28_aarch64,manylinux2014_aarch64 PY_VERSION=3.12 NO_TORCH=1 docker/wheelhouse.sh
#                                        # cross-download for a Jetson image (torch comes from its base);
#                                        # PIP_PLATFORM is a comma-separated list: pip does not count a
#                                        # manylinux_2_28 wheel (onnxruntime's) as manylinux2014, so name both
#   TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu docker/wheelhouse.sh
#                                        # CPU-only torch wheels (much smaller image), where reachable
#
# The set is the Makefile's install order: torch/torchvision, ultralytics (--no-deps: it would pull
# the GUI opencv-python), requirements.txt, plus setuptools to build this package offline.
set -euo pipefail
cd "$(dirname "$0")/.."

WHEELHOUSE=${WHEELHOUSE:-wheelhouse}
PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}
TORCH_VERSION=${TORCH_VERSION:-2.14.1}
TORCHVISION_VERSION=${TORCHVISION_VERSION:-0.29.1}
ULTRALYTICS_VERSION=${ULTRALYTICS_VERSION:-8.4.190}
SETUPTOOLS_VERSION=${SETUPTOOLS_VERSION:-80.9.0}
TORCH_INDEX_URL=${TORCH_INDEX_URL:-}   # empty: the configured index (PyPI: CUDA-enabled x86_64 wheels)
NO_TORCH=${NO_TORCH:-}                 # non-empty: skip torch/torchvision (Jetson: the base image has them)

mkdir -p "$WHEELHOUSE"
# Self-ignoring: the wheels never end up in git, whatever the root .gitignore says.
[[ -f "$WHEELHOUSE/.gitignore" ]] || echo "*" > "$WHEELHOUSE/.gitignore"
# Cross-platform downloads (another arch or Python) must be binary-only.
cross=()
if [[ -n "${PIP_PLATFORM:-}" || -n "${PY_VERSION:-}" ]]; then
    cross=(--only-binary=:all:)
    IFS=, read -r -a platforms <<< "${PIP_PLATFORM:-}"
    for platform in "${platforms[@]}"; do cross+=(--platform "$platform"); done
    [[ -n "${PY_VERSION:-}" ]] && cross+=(--python-version "$PY_VERSION")
fi
pip_download() { "$PYTHON" -m pip download --disable-pip-version-check -q -d "$WHEELHOUSE" "${cross[@]}" "$@"; }

start=$(date +%s)
if [[ -z "$NO_TORCH" ]]; then
    torch_index=()
    # With a torch index (CPU wheels), torch's own dependencies still come from the default index.
    [[ -n "$TORCH_INDEX_URL" ]] && torch_index=(--index-url "$TORCH_INDEX_URL" --extra-index-url https://pypi.org/simple)
    pip_download "${torch_index[@]}" "torch==$TORCH_VERSION" "torchvision==$TORCHVISION_VERSION"
fi
pip_download --no-deps "ultralytics==$ULTRALYTICS_VERSION"
pip_download -r requirements.txt "setuptools==$SETUPTOOLS_VERSION"
# Anything that came as an sdist is built into a wheel now, so the image needs no compiler.
shopt -s nullglob
sdists=("$WHEELHOUSE"/*.tar.gz "$WHEELHOUSE"/*.zip)
if (( ${#sdists[@]} )); then
    "$PYTHON" -m pip wheel --disable-pip-version-check -q --no-deps -w "$WHEELHOUSE" "${sdists[@]}"
    rm -f "${sdists[@]}"
fi
echo "wheelhouse: $WHEELHOUSE ($(ls "$WHEELHOUSE" | wc -l) files, $(du -sh "$WHEELHOUSE" | cut -f1)) in $(( $(date +%s) - start ))s"
