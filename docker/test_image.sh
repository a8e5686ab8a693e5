#!/usr/bin/env bash
# `make docker-test`: build the CPU image offline and check the running service against the library.
#
#  1. a Docker engine: the running one (DOCKER_HOST / default socket), else Debian's docker.io is
#     installed (apt-get) and a private dockerd is started (own socket and data-root, no bridge, no
#     iptables rules; overlay2, falling back to vfs);
#  2. a base image: $BASE_IMAGE when set, else a minimal Debian bookworm (python3.11 + venv) made
#     with debootstrap from the Debian mirror and `docker import`ed (no public registry needed);
#  3. wheelhouse/ (docker/wheelhouse.sh) unless it already holds wheels;
#  4. `docker build --network none` of docker/Dockerfile with --build-arg WHEELHOUSE=wheelhouse;
#  5. runs it on 127.0.0.1, waits for the HEALTHCHECK, POSTs an image to /v1/detect and compares the
#     detections with detector.weights.load_detector(model).predict(...) run here, in-process;
#  6. stops and removes everything it started (container, images, dockerd, its data-root, rootfs).
#
# Environment: BASE_IMAGE, PORT (default: a free one), KEEP=1 (keep images + dockerd for a rerun),
# IMAGE (the picture to send; default: a bundled one, else a scene of the bundled benchmark),
# PYTHON (host interpreter with the project installed; default .venv/bin/python), DOCKER (client).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PYTHON=${PYTHON:-$ROOT/.venv/bin/python}
TAG=${TAG:-casc-detector:docker-test}
WORK=$(mktemp -d /tmp/casc-docker-test.XXXXXX)
CONTAINER=casc-docker-test-$$
STARTED_DOCKERD=""
BUILT_BASE=""
T0=$(date +%s)
exec 3>&1  # log lines go to the original stdout, even from inside a redirected command
log() { printf '[docker-test %4ss] %s\n' "$(( $(date +%s) - T0 ))" "$*" >&3; }
die() { log "FAILED: $*"; exit 1; }
timed() { local s; s=$(date +%s); "$@"; log "  ($(( $(date +%s) - s ))s: $*)"; }

cleanup() {
    local rc=$?
    set +e
    trap - EXIT INT TERM
    if [[ -n "${DOCKER_BIN:-}" ]]; then
        if "${DOCKER_BIN[@]}" inspect "$CONTAINER" >/dev/null 2>&1; then
            [[ $rc -ne 0 ]] && { log "container log (tail):"; "${DOCKER_BIN[@]}" logs --tail 40 "$CONTAINER" 2>&1; }
            "${DOCKER_BIN[@]}" rm -f "$CONTAINER" >/dev/null
        fi
        if [[ -z "${KEEP:-}" ]]; then
            "${DOCKER_BIN[@]}" rmi -f "$TAG" >/dev/null 2>&1
            [[ -n "$BUILT_BASE" ]] && "${DOCKER_BIN[@]}" rmi -f "$BASE_IMAGE" >/dev/null 2>&1
            [[ -n "$STARTED_DOCKERD" ]] && "${DOCKER_BIN[@]}" builder prune -af >/dev/null 2>&1
        fi
    fi
    if [[ -n "$STARTED_DOCKERD" && -z "${KEEP:-}" ]]; then
        local pid
        pid=$(cat "$DOCKERD_DIR/dockerd.pid" 2>/dev/null)
        if [[ -n "$pid" ]]; then
            kill "$pid" 2>/dev/null
            for _ in $(seq 30); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
        fi
        # dockerd leaves its network namespace (and, if killed hard, layer) mounts behind.
        grep -o " $DOCKERD_DIR/[^ ]*" /proc/mounts | sort -r | xargs -r -n1 umount -l 2>/dev/null
        rm -rf "$DOCKERD_DIR"
    fi
    rm -rf "$WORK"
    log "cleaned up (exit $rc)"
    exit $rc
}
trap cleanup EXIT INT TERM

# --- 1. a Docker engine ------------------------------------------------------------------------
# A client that can use BuildKit: one with buildx, or a 19.03-22.x client (BuildKit built in).
pick_client() {
    local c v
    for c in ${DOCKER:-} docker /usr/bin/docker; do
        command -v "$c" >/dev/null 2>&1 || continue
        if "$c" buildx version >/dev/null 2>&1; then DOCKER_BIN=("$c"); return 0; fi
        v=$("$c" version --format '{{.Client.Version}}' 2>/dev/null || true)
        case "$v" in 19.*|20.*|21.*|22.*) DOCKER_BIN=(env DOCKER_BUILDKIT=1 "$c"); return 0 ;; esac
    done
    return 1
}
engine_up() { "${DOCKER_BIN[@]}" info >/dev/null 2>&1; }

pick_client || true
if [[ -z "${DOCKER_BIN:-}" ]] || ! engine_up; then
    if ! command -v dockerd >/dev/null 2>&1; then
        log "installing Debian's docker.io (no Docker engine here)"
        timed apt-get update -qq
        DEBIAN_FRONTEND=noninteractive timed apt-get install -y -qq docker.io >/dev/null
    fi
    pick_client || die "no docker client with BuildKit (need buildx, or Debian's docker.io client)"
    DOCKERD_DIR=${DOCKERD_DIR:-/var/tmp/casc-dockerd}
    mkdir -p "$DOCKERD_DIR"
    export DOCKER_HOST="unix://$DOCKERD_DIR/docker.sock"
    # Ours, left by an earlier KEEP=1 run: reuse it (and stop it at the end unless KEEP=1 again).
    engine_up && STARTED_DOCKERD=1
    if ! engine_up; then
        for driver in overlay2 vfs; do
            log "starting dockerd (storage driver $driver, data-root $DOCKERD_DIR/data)"
            dockerd --data-root "$DOCKERD_DIR/data" --exec-root "$DOCKERD_DIR/exec" \
                --pidfile "$DOCKERD_DIR/dockerd.pid" -H "$DOCKER_HOST" --storage-driver "$driver" \
                --bridge=none --iptables=false --ip-masq=false >"$DOCKERD_DIR/dockerd.log" 2>&1 &
            STARTED_DOCKERD=1
            for _ in $(seq 30); do engine_up && break; sleep 1; done
            engine_up && break
            log "dockerd did not come up with $driver:"; tail -5 "$DOCKERD_DIR/dockerd.log"
            kill "$(cat "$DOCKERD_DIR/dockerd.pid" 2>/dev/null)" 2>/dev/null || true
            sleep 2
        done
        engine_up || die "dockerd cannot run here (see $DOCKERD_DIR/dockerd.log)"
    fi
fi
log "engine: $("${DOCKER_BIN[@]}" info --format '{{.ServerVersion}} {{.Driver}}') via ${DOCKER_HOST:-default socket}"
# Our own dockerd has no bridge: containers share the host network, bound to 127.0.0.1 only.
if [[ -n "$STARTED_DOCKERD" ]]; then NET=host; else NET=${NET:-publish}; fi

# --- 2. a base image ---------------------------------------------------------------------------
if [[ -z "${BASE_IMAGE:-}" ]]; then
    BASE_IMAGE=casc-base:bookworm
    if ! "${DOCKER_BIN[@]}" image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
        command -v debootstrap >/dev/null 2>&1 || {
            log "installing debootstrap"; apt-get update -qq
            DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null; }
        log "debootstrap: minimal Debian bookworm with python3 + venv"
        timed debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
            bookworm "$WORK/rootfs" "${DEBIAN_MIRROR:-http://deb.debian.org/debian}" >"$WORK/debootstrap.log" 2>&1 \
            || { tail -20 "$WORK/debootstrap.log"; die "debootstrap failed"; }
        rm -rf "$WORK"/rootfs/var/cache/apt/archives/*.deb "$WORK"/rootfs/var/lib/apt/lists/*
        tar -C "$WORK/rootfs" -c . | "${DOCKER_BIN[@]}" import -c 'ENV LANG=C.UTF-8' -c 'CMD ["/bin/bash"]' \
            - "$BASE_IMAGE" >/dev/null
        rm -rf "$WORK/rootfs"
        BUILT_BASE=1
    fi
fi
log "base image: $BASE_IMAGE"

# --- 3. the wheelhouse -------------------------------------------------------------------------
if ! ls wheelhouse/*.whl >/dev/null 2>&1; then
    log "preparing wheelhouse/ (docker/wheelhouse.sh)"
    timed bash docker/wheelhouse.sh
fi
log "wheelhouse: $(ls wheelhouse/*.whl | wc -l) wheels, $(du -sh wheelhouse | cut -f1)"

# --- 4. offline build --------------------------------------------------------------------------
# The build needs about three wheelhouses of free disk where the engine keeps its data: one for the
# synced build context and two for the installed virtual environment. Say so before starting,
# rather than failing with "no space left on device" minutes into the build.
ROOT_DIR=$("${DOCKER_BIN[@]}" info --format '{{.DockerRootDir}}' 2>/dev/null || true)
if [[ -d "$ROOT_DIR" ]]; then
    need_kb=$(( 3 * $(du -sk wheelhouse | cut -f1) + 1024 * 1024 ))
    free_kb=$(df -Pk "$ROOT_DIR" | awk 'NR == 2 {print $4}')
    log "disk: $(( free_kb / 1024 / 1024 )) GB free at $ROOT_DIR, the build needs about $(( need_kb / 1024 / 1024 )) GB"
    (( free_kb >= need_kb )) || die "not enough disk for the image build at $ROOT_DIR: $(( free_kb / 1024 )) MB free, about $(( need_kb / 1024 )) MB needed"
fi
log "building $TAG offline (--network none)"
s=$(date +%s)
"${DOCKER_BIN[@]}" build --progress plain --network none -f docker/Dockerfile \
    --build-arg BASE_IMAGE="$BASE_IMAGE" --build-arg WHEELHOUSE=wheelhouse -t "$TAG" . >"$WORK/build.log" 2>&1 \
    || { tail -40 "$WORK/build.log"; die "docker build failed"; }
BUILD_S=$(( $(date +%s) - s ))
SIZE=$("${DOCKER_BIN[@]}" image inspect -f '{{.Size}}' "$TAG")
log "built in ${BUILD_S}s; image size $(( SIZE / 1000000 )) MB"
grep -E "install.sh: (torch|casc)" "$WORK/build.log" | sed 's/^/    /' || true
[[ "$("${DOCKER_BIN[@]}" image inspect -f '{{.Config.User}}' "$TAG")" != "" ]] || die "image runs as root"

# --- 5. model + image, then run ----------------------------------------------------------------
# The bundled default (weights/manifest.json, inside the image) when there is one; else a tiny
# random YOLO checkpoint with its own manifest, mounted read-only at /weights (the user-weights path).
MODEL=$("$PYTHON" - <<'PY'
from detector.weights import load_manifest
qann = [name for name, entry in load_manifest().items() if entry.kind == "qann" and entry.path.is_file()]
print(qann[0] if qann else "")
PY
)
RUN_ARGS=()
if [[ -n "$MODEL" ]]; then
    WEIGHTS_DIR=$ROOT/weights
    log "model: bundled '$MODEL' (weights inside the image)"
else
    WEIGHTS_DIR=$WORK/weights
    mkdir -p "$WEIGHTS_DIR"
    MODEL=tiny-docker-test
    "$PYTHON" - "$WEIGHTS_DIR" "$MODEL" <<'PY'
import json, sys
from pathlib import Path
import torch
from detector.models.yolo import build_qann, export_checkpoint
from detector.weights import sha256_of
folder, name = Path(sys.argv[1]), sys.argv[2]
torch.manual_seed(0)
qann = build_qann("yolov8n.yaml", levels=4, nc=3)
with torch.no_grad():  # class logits of -1 instead of the tiny prior: scores 0.27, so there are detections
    for branch in qann.model[-1].cv3:
        branch[-1].bias.fill_(-1.0)
export_checkpoint(qann, folder / f"{name}.pt", names=["a", "b", "c"], imgsz=128)
(folder / "manifest.json").write_text(json.dumps({"models": [{
    "name": name, "family": "yolo", "kind": "qann", "file": f"{name}.pt",
    "sha256": sha256_of(folder / f"{name}.pt"), "levels": 4, "imgsz": 128}]}))
PY
    chmod -R a+rX "$WORK"
    RUN_ARGS+=(-v "$WEIGHTS_DIR:/weights:ro")
    log "model: no bundled weights; a tiny random checkpoint mounted at /weights"
fi
IMAGE=${IMAGE:-$(ls weights/*.jpg weights/*.png weights/samples/* service/static/*.jpg service/static/*.png \
    2>/dev/null | head -1 || true)}
if [[ -z "$IMAGE" ]]; then
    # A scene of the bundled benchmark (what the bundled detectors were trained on), 256x256 PNG.
    IMAGE=$WORK/scene.png
    "$PYTHON" - "$IMAGE" <<'PY'
import sys
import numpy as np
from PIL import Image
from detector.data.synthetic import render_scene
image, boxes, labels, _ = render_scene(np.random.default_rng(7), 256)
Image.fromarray(image).save(sys.argv[1])
print(f"    scene with {len(boxes)} objects")
PY
fi
log "image: $IMAGE"

PORT=${PORT:-$("$PYTHON" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
if [[ "$NET" == host ]]; then
    RUN_ARGS+=(--network host -e CASC_HOST=127.0.0.1 -e CASC_PORT="$PORT")
else
    RUN_ARGS+=(-p "127.0.0.1:$PORT:8000")
fi
"${DOCKER_BIN[@]}" run -d --name "$CONTAINER" "${RUN_ARGS[@]}" -e CASC_MODEL="$MODEL" -e CASC_THREADS=1 \
    --health-interval 2s --health-start-period 300s "$TAG" >/dev/null
log "container $CONTAINER on 127.0.0.1:$PORT ($NET network); waiting for the HEALTHCHECK"
s=$(date +%s)
while :; do
    status=$("${DOCKER_BIN[@]}" inspect -f '{{.State.Status}} {{.State.Health.Status}}' "$CONTAINER")
    [[ "$status" == "running healthy" ]] && break
    [[ "$status" == running* ]] || die "container stopped: $status"
    (( $(date +%s) - s < 300 )) || die "not healthy after 300s: $status"
    sleep 2
done
log "healthy after $(( $(date +%s) - s ))s"

# --- 6. the service's detections == the library's ---------------------------------------------
CASC_WEIGHTS=$WEIGHTS_DIR "$PYTHON" - "http://127.0.0.1:$PORT" "$MODEL" "$IMAGE" <<'PY'
import sys, time
import httpx
from detector.weights import load_detector
url, model, image = sys.argv[1:4]
with httpx.Client(base_url=url, timeout=120) as client:
    for path in ("/healthz", "/readyz", "/v1/models"):
        r = client.get(path)
        assert r.status_code == 200, (path, r.status_code, r.text)
    detector = load_detector(model)
    counts = []
    for conf in (0.25, 0.05):
        t = time.perf_counter()
        with open(image, "rb") as f:
            r = client.post("/v1/detect", params={"conf": conf, "model": model},
                            files={"file": ("scene.png", f, "image/png")})
        assert r.status_code == 200, (r.status_code, r.text)
        served = r.json()["detections"]  # the same keys as Results.to_dict()'s (class_id, name, score, box)
        local = detector.predict(image, conf=conf)[0].to_dict()["detections"]
        assert len(served) == len(local), (conf, len(served), len(local))
        key = lambda d: (d["class_id"], round(d["score"], 3), [round(v) for v in d["box"]])
        for a, b in zip(sorted(served, key=key), sorted(local, key=key)):
            assert a["class_id"] == b["class_id"] and a["name"] == b["name"], (a, b)
            assert abs(a["score"] - b["score"]) < 1e-4, (a, b)
            assert max(abs(x - y) for x, y in zip(a["box"], b["box"])) < 1e-2, (a, b)
        counts.append(len(served))
        print(f"    conf={conf}: {len(served)} detections, identical to the in-process predict "
              f"({time.perf_counter() - t:.2f}s)")
    assert max(counts) > 0, "no detections to compare: use a model/image that detects something"
PY
"${DOCKER_BIN[@]}" exec "$CONTAINER" id -u | grep -qvx 0 || die "service runs as root"
log "PASSED: build ${BUILD_S}s, image $(( SIZE / 1000000 )) MB"
