#!/usr/bin/env bash
# Build the daemon's image and check it the way deploy/kubernetes runs it, on this machine:
# the daemon as user 10001 with a read-only root, no capabilities, no new privileges, the host's
# IPC and PID namespaces and a socket volume; a worker of another user in group 10001 passes
# `loracache doctor`, one outside the group is refused with the fix; `stop` ends it cleanly.
#
#   deploy/check-image.sh [IMAGE]                  # docker; IMAGE defaults to loracache:check
#   ENGINE=podman deploy/check-image.sh            # any docker-compatible CLI (words allowed)
#   BUILD_ARGS="--build-arg BASE=python:3.11-slim --build-arg TORCH=cpu" deploy/check-image.sh
#   SKIP_BUILD=1 deploy/check-image.sh my-registry/loracache:cuda   # check a pushed image
#   RUN_ARGS="--gpus all" deploy/check-image.sh    # on a GPU host: the daemon serves the GPUs
#
# Exit 0 when every check passes; each line says what was checked. Needs bash 3.2 or newer.
set -euo pipefail

read -r -a engine <<< "${ENGINE:-docker}"
read -r -a build_args <<< "${BUILD_ARGS:-}"
read -r -a run_args <<< "${RUN_ARGS:-}"
image=${1:-loracache:check}
repo=$(cd "$(dirname "$0")/.." && pwd)
name=loracache-check-$$
volume=loracache-check-$$

cleanup() {
  "${engine[@]}" rm -f "$name" > /dev/null 2>&1 || true
  "${engine[@]}" volume rm -f "$volume" > /dev/null 2>&1 || true
}
trap cleanup EXIT
fail() {
  echo "FAIL  $*"
  if "${engine[@]}" container inspect "$name" > /dev/null 2>&1; then
    "${engine[@]}" logs "$name" 2>&1 | tail -20
  fi
  exit 1
}

# Podman keeps HEALTHCHECK only in the docker format, and its --read-only leaves /run and
# /var/tmp writable unless told not to (Kubernetes' read-only root does not).
build_flags=() read_only=(--read-only --tmpfs /tmp)
if "${engine[@]}" --version | grep -qi podman; then
  build_flags=(--format docker) read_only+=(--read-only-tmpfs=false)
fi
if [[ "${SKIP_BUILD:-0}" == 0 ]]; then
  "${engine[@]}" build ${build_flags[@]+"${build_flags[@]}"} \
    ${build_args[@]+"${build_args[@]}"} -t "$image" "$repo"
  echo "ok    built $image"
fi
"${engine[@]}" image inspect "$image" > /dev/null 2>&1 || "${engine[@]}" pull "$image"
health=$("${engine[@]}" image inspect --format '{{json .Config.Healthcheck}}' "$image")
[[ "$health" == *'"Test":["CMD",'* ]] || fail "the image has no HEALTHCHECK in exec form: $health"
read -r -a health_command <<< "$(sed -E 's/.*"Test":\["CMD",([^]]*)\].*/\1/' <<< "$health" \
  | tr -d '"' | tr ',' ' ')"

# A new named volume takes the image's /run/loracache, owned by 10001 (the DaemonSet's init
# container does this for its hostPath).
"${engine[@]}" volume create "$volume" > /dev/null
"${engine[@]}" run -d --name "$name" "${read_only[@]}" --user 10001:10001 \
  --cap-drop ALL --security-opt no-new-privileges --ipc host --pid host \
  -v "$volume:/run/loracache" ${run_args[@]+"${run_args[@]}"} "$image" > /dev/null
healthy=false
for _ in $(seq 60); do
  if "${engine[@]}" exec "$name" "${health_command[@]}"; then healthy=true; break; fi
  sleep 1
done > /dev/null 2>&1
$healthy || fail "the image's health check (${health_command[*]}) never passed in 60 s"
echo "ok    the daemon serves as 10001 with a read-only root; its health check (${health_command[*]}) passes"

worker() {  # a worker pod's container: another user, sharing the socket and the host's IPC
  "${engine[@]}" run --rm "${read_only[@]}" --ipc host --pid host --user 10002:10002 \
    --cap-drop ALL --security-opt no-new-privileges -v "$volume:/run/loracache" \
    ${run_args[@]+"${run_args[@]}"} "$@" --entrypoint loracache "$image" doctor
}
worker --group-add 10001 || fail "doctor in a worker of group 10001"
echo "ok    a worker in group 10001 passes loracache doctor"
if refused=$(worker 2>&1); then
  fail "a worker outside group 10001 was let in: $refused"
fi
grep -q supplementalGroups <<< "$refused" || fail "no fix offered to a worker outside the group: $refused"
echo "ok    a worker outside group 10001 is refused, and told to join it"

"${engine[@]}" stop -t 30 "$name" > /dev/null
code=$("${engine[@]}" inspect --format '{{.State.ExitCode}}' "$name")
[[ "$code" == 0 ]] || fail "the daemon exited $code on SIGTERM"
"${engine[@]}" logs "$name" 2>&1 | grep -q "loracache.daemon: stopped" || fail "no clean stop logged"
echo "ok    SIGTERM stops it cleanly (exit 0)"
