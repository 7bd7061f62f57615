#!/usr/bin/env bash
# The project's tests (what CI runs): every test on the best engine path this CPU has, then
# the bf16 engine's unit tests (products, forward against burn's f32 path, every gradient
# against burn's autodiff) once more on each lower path the CPU runs, forced through
# DINO_ENGINE_PATH. Ends with the engine paths tested and the ones this CPU lacks. Built with
# the `mpi` feature, so the two-process training tests run under mpirun (Debian:
# libopenmpi-dev openmpi-bin libclang-dev; .ci/run installs them).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo test --locked --features mpi "$@"
mapfile -t paths < <("${CARGO_TARGET_DIR:-target}/debug/dino" cpu-info --paths)
for path in "${paths[@]:1}"; do
  echo "== bf16 engine unit tests on the $path path"
  DINO_ENGINE_PATH=$path cargo test --locked --features mpi --lib engine::
done
missing=$(printf '%s\n' amx avx512bf16 avx2 portable | grep -vxF -f <(printf '%s\n' "${paths[@]}") | paste -sd, - || true)
echo "engine paths tested: $(printf '%s\n' "${paths[@]}" | paste -sd, -); not on this CPU, untested: ${missing:-none}"
