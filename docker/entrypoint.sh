#!/bin/sh
# Container entry point: environment variables -> `casc serve` flags.
#
#   CASC_MODEL        bundled model name or checkpoint path (e.g. /weights/my-coco-qann.pt); unset: the
#                     service's default
#   CASC_HOST         listen address (default 0.0.0.0)
#   CASC_PORT         listen port (default 8000; the HEALTHCHECK follows it)
#   CASC_THREADS      torch intra-op threads (also OMP_NUM_THREADS / MKL_NUM_THREADS unless set)
#   CASC_MAX_UPLOAD_MB, CASC_MAX_PIXELS, CASC_QUEUE_SIZE, CASC_TIMEOUT_S, CASC_MAX_BATCH, CASC_DEVICE, ...
#                     every CASC_<NAME> listed in EXTRA_FLAGS below becomes --<name> when set and the
#                     installed `casc serve` accepts it
#   CASC_SERVE_ARGS   anything else, appended verbatim (word-split)
#   CASC_WEIGHTS      the weights folder (manifest.json + checkpoints). Unset: /weights when a
#                     manifest.json is mounted there, else the bundled weights in the image.
#
# `docker run IMAGE --flag ...` appends flags to `casc serve`; `docker run IMAGE casc demo` (or any
# other command) runs that command instead.
set -eu

if [ -z "${CASC_WEIGHTS:-}" ]; then
    if [ -f /weights/manifest.json ]; then
        CASC_WEIGHTS=/weights
    else
        CASC_WEIGHTS=${CASC_BUNDLED_WEIGHTS:-/opt/casc/weights}
    fi
fi
export CASC_WEIGHTS

if [ -n "${CASC_THREADS:-}" ]; then
    export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$CASC_THREADS}" MKL_NUM_THREADS="${MKL_NUM_THREADS:-$CASC_THREADS}"
fi

# A command that is not a flag: run it as it is.
if [ "$#" -gt 0 ] && [ "${1#-}" = "$1" ]; then
    exec "$@"
fi

help=$(casc serve --help 2>/dev/null || true)
accepts() { printf '%s\n' "$help" | grep -Eq -- "--$1([ =,]|\$)"; }

set -- --host "${CASC_HOST:-0.0.0.0}" --port "${CASC_PORT:-8000}" "$@"
# CASC_MODEL may list several models (comma or space separated); the first is the default.
if [ -n "${CASC_MODEL:-}" ]; then
    models=""
    for model in $(printf '%s' "$CASC_MODEL" | tr ',' ' '); do models="$models --model $model"; done
    # shellcheck disable=SC2086
    set -- $models "$@"
fi
[ -n "${CASC_THREADS:-}" ] && accepts threads && set -- --threads "$CASC_THREADS" "$@"

# CASC_<NAME> -> --<name> (underscores become dashes), only for flags this `casc serve` has.
EXTRA_FLAGS="MAX_PIXELS MAX_UPLOAD_MB QUEUE_SIZE TIMEOUT_S BATCH_WINDOW_MS MAX_BATCH MAX_VIDEO_FRAMES MAX_VIDEO_S
    MAX_VIDEO_DISK_MB LIMIT_CONCURRENCY ALLOW_ORIGIN DEVICE DEMO_IMAGE LOG_LEVEL"
for name in $EXTRA_FLAGS; do
    value=$(printenv "CASC_$name" || true)
    [ -n "$value" ] || continue
    flag=$(printf '%s' "$name" | tr 'A-Z_' 'a-z-')
    if accepts "$flag"; then
        set -- "$@" "--$flag" "$value"
    else
        echo "entrypoint: CASC_$name is set but \`casc serve\` has no --$flag; ignored" >&2
    fi
done
# shellcheck disable=SC2086
exec casc serve "$@" ${CASC_SERVE_ARGS:-}
