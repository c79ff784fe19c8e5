#!/usr/bin/env bash
# One-shot GPU check of ripper-dist on a machine with an NVIDIA GPU: install, environment, tests/gpu, benchmarks.
#
#   bash jobs/gpu_check.sh [--budget SECONDS] [--only STEPS] [--skip STEPS] [--device cuda[:N]] [--quick]
#                          [--no-install] [--no-background] [--dry-run]
#   bash jobs/gpu_check.sh --start-prepare      # install what is there, start the exports in the background, return
#   bash jobs/gpu_check.sh --pack DIR           # (on a machine with network) build offline parts, see "Offline" below
#
# Run it from anywhere; it works in the repository that holds it. Everything it prints goes to the terminal and to
# one results file: $GPU_CHECK_RESULTS, else $OUT/gpu_check.txt when OUT is set, else ./gpu_check_results.txt.
#
# Steps, most valuable first (names for --only/--skip). Each has its own timeout and is also cut to what is left of
# --budget (default 540 s: the whole run fits in about 9 minutes on one H200 with 16 cores); a failing or timed-out
# step is recorded and the next one runs. A summary with every step's exit status ends the file.
#   env            nvidia-smi, versions, onnxruntime.get_available_providers(), and a CUDA session that really runs
#                  (MatMul through cuBLAS, Conv through cuDNN) on the GPU, checked against numpy (after the gpu
#                  extra's libraries are preloaded, as ripper-dist does), then `ripper-dist doctor -d cuda`
#   engine         python jobs/bench.py engine --seconds 60 --device cuda            (fp32, --batch-size auto)
#   tests          python -m pytest -q tests/gpu
#   engine-fp16    python jobs/bench.py engine --seconds 60 --device cuda --precision fp16
#   trt            python jobs/bench.py engine --seconds 60 --device tensorrt --no-bare  (TensorRT fp32 vs torch)
#   roformer       python jobs/bench.py roformer --config vocals --seconds 30 --device cuda
#   cli            python jobs/bench.py cli --seconds 60 --device cuda       (demucs CLI vs separate, local and Ray)
#   trt-fp16       python jobs/bench.py engine --seconds 60 --device tensorrt --precision fp16 --no-bare
#   engine-b1      python jobs/bench.py engine --seconds 60 --device cuda --batch-size 1   (batching's share)
#   roformer-fp16  python jobs/bench.py roformer --config vocals --seconds 30 --device cuda --precision fp16
# --quick: 10 s tracks (a plumbing check, e.g. `--device cpu --quick --only env,engine --no-install --no-background`
# on a machine without a GPU). --no-background: exports happen inside the steps. --dry-run: print, run nothing.
#
# Exports (CPU, minutes on few cores) do not wait for the GPU: right after the install a background worker exports
# and caches, in the order the steps need them, the bench's released-size htdemucs (fp32, then fp16), the released
# model tests/gpu builds (fp32 and fp16) and the RoFormer vocals graphs (fp32 and fp16). Each step waits only for the
# graphs it needs. While that worker runs it is pinned to the upper 3/4 of the cores (taskset) and the benchmarks to
# the lower quarter with --threads to match (printed with each step); the bench's own timing starts after its
# untimed warm-up. tests/gpu runs with a small pytest plugin (written under the work dir) that points every test's
# tmp_path/cache at that one shared cache, so the released-size model is exported once instead of once per test.
# Caches live in $GPU_CHECK_WORK (default ${TMPDIR:-/tmp}/ripper-dist-gpu-check): RIPPER_DIST_CACHE=$WORK/cache,
# RIPPER_DIST_BENCH_DIR=$WORK/bench. A second run on the same machine exports nothing.
#
# Install (skipped with --no-install):
#   online:  pip install -e ".[gpu,export,test]"; where pyproject has no `gpu` extra, ".[export,test]" and then
#            onnxruntime-gpu in place of onnxruntime (the two packages share one folder: CPU one removed first).
#   Offline: when $GPU_CHECK_WHEELS (default ./.gpuwheels) exists, nothing is downloaded. Everything in it and in its
#            sub-folders is installed with `pip --no-index --no-deps --target $WORK/site` (wheels) or unpacked there
#            (*.tar.xz trees; *.so.xz files are shared libraries that go into onnxruntime/capi/ once onnxruntime is
#            there: onnxruntime-gpu split in parts). The repository goes on PYTHONPATH, with a `ripper_export -> export`
#            link (pyproject's package-dir) in $WORK/shim. Each part is installed once (markers in $WORK), so parts may
#            arrive in several calls on the same machine: `--start-prepare` installs what has arrived and starts the
#            background exports, and returns; the next call installs the rest and runs the steps.
#            The CUDA libraries (cuBLAS, cuDNN, cuFFT, cuRAND, cudart) are taken from the pip `nvidia-*` packages of the
#            python that runs this (torch's), through LD_LIBRARY_PATH.
#   --pack DIR  (run where pip can download; needs python3, pip, xz, readelf, strip) writes DIR/a and DIR/b, each
#            under the 64 MiB a lent device machine accepts per call: onnxruntime-gpu with the CUDA kernels of
#            other GPU generations zeroed (only sm_$GPU_CHECK_SM, default 90 = H100/H200, kept: 284 MB -> 52 MB xz),
#            Ray without Java, RLlib and source maps, and the small wheels (demucs, bs-roformer, soundfile, soxr...).
#            Carry DIR/a in one call (with --start-prepare), DIR/b in the next.
# Lent device machines (this workplace's `run` tool; seen 2026-12-04 on an H200): files under /tmp stay between calls
# while the machine is warm (30 s), but an ignored folder of the repo that a call does not carry again is gone in that
# call. So $WORK is under /tmp, --start-prepare runs its worker from a copy in $WORK/src, and each call carries the
# snapshot it runs (e.g. `git archive HEAD` unpacked into an ignored folder) and only its own part of the wheels:
#   call 1: carry [.gpuwheels (a/), .gpucheck]  GPU_CHECK_WORK=/tmp/gc GPU_CHECK_WHEELS=$PWD/.gpuwheels
#           bash .gpucheck/src/jobs/gpu_check.sh --start-prepare
#   call 2: carry [.gpuwheels-b, .gpurun]       GPU_CHECK_WORK=/tmp/gc GPU_CHECK_WHEELS=$PWD/.gpuwheels-b
#           bash .gpurun/src/jobs/gpu_check.sh --budget 560                (ran in 353 s; results in $OUT)
# Environment: PYTHON (default python3), GPU_CHECK_WORK, GPU_CHECK_WHEELS, GPU_CHECK_RESULTS, OUT.
# TensorRT: where the TensorRT libraries are absent the TensorRT test fails and this says so
# ("TensorRT provider not available"); nothing else depends on it.
set -u -o pipefail

SELF=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/$(basename "${BASH_SOURCE[0]}")
ROOT=$(cd "$(dirname "$SELF")/.." && pwd)
cd "$ROOT" || exit 1
PY=${PYTHON:-python3}
WORK=${GPU_CHECK_WORK:-${TMPDIR:-/tmp}/ripper-dist-gpu-check}
WHEELS=${GPU_CHECK_WHEELS:-$ROOT/.gpuwheels}
SITE=$WORK/site
BUDGET=540
DEVICE=cuda
ONLY=""
SKIP=""
DRY=0
INSTALL=1
QUICK=0
MODE=run
PACK_DIR=""
BACKGROUND=1
ARGS="$*"
ALL_STEPS="env engine tests engine-fp16 trt roformer cli trt-fp16 engine-b1 roformer-fp16"

while (($#)); do
  case $1 in
    --budget) BUDGET=$2; shift ;;
    --only) ONLY=${2//,/ }; shift ;;
    --skip) SKIP=${2//,/ }; shift ;;
    --device) DEVICE=$2; shift ;;
    --quick) QUICK=1 ;;
    --no-install) INSTALL=0 ;;
    --no-background) BACKGROUND=0 ;;
    --dry-run) DRY=1 ;;
    --start-prepare) MODE=start-prepare ;;
    --_prepare-worker) MODE=worker ;;
    --pack) MODE=pack; PACK_DIR=$2; shift ;;
    -h|--help) sed -n "2,/^set -u/p" "$SELF" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

START=$(date +%s)
DEADLINE=$((START + BUDGET))
NCPU=$(nproc 2>/dev/null || echo 1)
SECS=60; RSECS=30
((QUICK)) && { SECS=10; RSECS=10; }
mkdir -p "$WORK"

# -- pack (local, with network) -----------------------------------------------------------------------------------
pack() {
  local dir=$1 sm=${GPU_CHECK_SM:-90} dl tmp
  dl=$(mktemp -d); tmp=$(mktemp -d)
  mkdir -p "$dir/a" "$dir/b"
  local plat="--only-binary=:all: --no-deps --python-version ${GPU_CHECK_PYVER:-3.12} --implementation cp
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64"
  # shellcheck disable=SC2086
  "$PY" -m pip download -q $plat -d "$dl" onnxruntime-gpu==1.31.1 ray==2.60.0 demucs==4.1.0 julius==0.2.8 \
    lameenc==1.9.0 sphn==0.2.1 bs-roformer==0.3.10 beartype==0.23.1 rotary-embedding-torch==0.9.1 librosa==0.11.0 \
    audioread==3.1.0 decorator==5.3.1 pooch==1.9.0 platformdirs==4.14.9 lazy-loader==0.6 jsonschema==4.26.0 \
    jsonschema-specifications==2025.9.1 referencing==0.37.0 rpds-py==2026.9.1 cffi==2.1.1 pycparser==3.12 \
    soundfile==0.14.0 soxr==1.1.0 || return 1
  (cd "$tmp" && mkdir ort ray && unzip -q "$dl"/onnxruntime_gpu-*.whl -d ort && unzip -q "$dl"/ray-*.whl -d ray) || return 1
  local cuda=$tmp/ort/onnxruntime/capi/libonnxruntime_providers_cuda.so
  "$PY" - "$cuda" "$sm" <<'EOF' || return 1
import re, struct, subprocess, sys
path, keep = sys.argv[1], int(sys.argv[2])
data = bytearray(open(path, "rb").read())
m = re.search(r"\.nv_fatbin\s+PROGBITS\s+\S+\s+(\S+)\s+(\S+)", subprocess.check_output(["readelf", "-SW", path]).decode())
p, end, zeroed = int(m.group(1), 16), int(m.group(1), 16) + int(m.group(2), 16), 0
while p < end:  # fatbin containers: header (magic, version, header size, payload size), then entries
    magic, _, hsize, fsize = struct.unpack_from("<IHHQ", data, p)
    if magic != 0xBA55ED50:
        p += 8
        continue
    q, e = p + hsize, p + hsize + fsize
    while q < e:  # entry: kind, version, header size, padded payload size, ..., sm at offset 28
        kind, _, ehs, padded = struct.unpack_from("<HHII", data, q)
        sm = struct.unpack_from("<I", data, q + 28)[0]
        if sm != keep:
            data[q + ehs:q + ehs + padded] = bytes(padded)
            zeroed += padded
        q += ehs + padded
    p = e
open(path, "wb").write(data)
print(f"zeroed {zeroed / 1e6:.0f} MB of CUDA kernels for other GPUs (kept sm_{keep})")
EOF
  xz -9 -T0 -c "$cuda" > "$dir/a/libonnxruntime_providers_cuda.so.xz" && rm "$cuda"
  rm -f "$tmp"/ort/onnxruntime/capi/libonnxruntime_providers_tensorrt.so
  tar -C "$tmp/ort" -cf - . | xz -9 -T0 > "$dir/b/onnxruntime-gpu.tar.xz"
  (cd "$tmp/ray" && rm -rf ray/jars ray/rllib ray/llm && find ray/dashboard -name '*.map' -delete &&
    strip --strip-unneeded ray/_raylet.so ray/core/src/ray/raylet/raylet ray/core/src/ray/gcs/gcs_server)
  tar -C "$tmp/ray" -cf - . | xz -9 -T0 > "$dir/b/ray.tar.xz"
  mv "$dl"/sphn-*.whl "$dir/b/"
  rm -f "$dl"/onnxruntime_gpu-*.whl "$dl"/ray-*.whl
  mv "$dl"/*.whl "$dir/a/"
  rm -rf "$dl" "$tmp"
  du -sh "$dir/a" "$dir/b"
}

if [[ $MODE == pack ]]; then
  pack "$PACK_DIR"; exit $?
fi

# -- install ------------------------------------------------------------------------------------------------------
offline() { [[ -d $WHEELS ]]; }

# Unpack a tree archive into $SITE: top-level entries are renamed into place (a process importing meanwhile sees
# a package whole or not at all); shared libraries waiting in $WORK/pending go into onnxruntime/capi/ first.
unpack_tree() {
  local arc=$1 tmp
  tmp=$(mktemp -d "$WORK/unpack.XXXXXX")
  xz -dc "$arc" | tar -x -C "$tmp" || { echo "!! could not unpack $arc"; return 1; }
  [[ -d $tmp/onnxruntime/capi ]] && compgen -G "$WORK/pending/*.so" >/dev/null && cp "$WORK"/pending/*.so "$tmp/onnxruntime/capi/"
  local e
  for e in "$tmp"/* "$tmp"/.[!.]*; do
    [[ -e $e ]] || continue
    rm -rf "$SITE/${e##*/}"
    mv "$e" "$SITE/"
  done
  rm -rf "$tmp"
}

install_offline() {
  mkdir -p "$SITE" "$WORK/pending" "$WORK/markers"
  local f base wheels=()
  shopt -s nullglob
  for f in "$WHEELS"/*.so.xz "$WHEELS"/*/*.so.xz; do
    base=${f##*/}; base=${base%.xz}
    [[ -e $WORK/markers/$base ]] && continue
    xz -dc "$f" > "$WORK/pending/$base.tmp" && mv "$WORK/pending/$base.tmp" "$WORK/pending/$base" || continue
    if [[ -d $SITE/onnxruntime/capi ]]; then cp "$WORK/pending/$base" "$SITE/onnxruntime/capi/$base.tmp" &&
      mv "$SITE/onnxruntime/capi/$base.tmp" "$SITE/onnxruntime/capi/$base"; fi
    touch "$WORK/markers/$base"; echo "installed $f"
  done
  for f in "$WHEELS"/*.whl "$WHEELS"/*/*.whl; do
    [[ -e $WORK/markers/${f##*/} ]] || wheels+=("$f")
  done
  if ((${#wheels[@]})); then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "${wheels[@]}" \
      && for f in "${wheels[@]}"; do touch "$WORK/markers/${f##*/}"; echo "installed ${f##*/}"; done \
      || echo "!! pip could not install the wheels in $WHEELS"
  fi
  for f in "$WHEELS"/*.tar.xz "$WHEELS"/*/*.tar.xz; do
    [[ -e $WORK/markers/${f##*/} ]] && continue
    unpack_tree "$f" && touch "$WORK/markers/${f##*/}" && echo "installed $f"
  done
  shopt -u nullglob
}

install_online() {
  if grep -Eq '^[[:space:]]*tensorrt[[:space:]]*=' pyproject.toml; then
    "$PY" -m pip install -q -e ".[gpu,tensorrt,export,test]"   # tensorrt: TensorRT 10 wheels for the trt steps
  elif grep -Eq '^[[:space:]]*gpu[[:space:]]*=' pyproject.toml; then
    "$PY" -m pip install -q -e ".[gpu,export,test]"
  else
    echo "pyproject has no gpu extra: .[export,test], then onnxruntime-gpu in place of onnxruntime"
    "$PY" -m pip install -q -e ".[export,test]" || return 1
    if ! "$PY" -m pip show -q onnxruntime-gpu >/dev/null 2>&1; then
      "$PY" -m pip uninstall -q -y onnxruntime 2>/dev/null
      "$PY" -m pip install -q onnxruntime-gpu
    fi
  fi
}

setup_env() {
  export RIPPER_DIST_CACHE=$WORK/cache RIPPER_DIST_BENCH_DIR=$WORK/bench PYTHONUNBUFFERED=1
  mkdir -p "$WORK/shim" "$RIPPER_DIST_CACHE" "$RIPPER_DIST_BENCH_DIR"
  ln -sfn "$ROOT/export" "$WORK/shim/ripper_export"
  cat > "$WORK/shim/gpu_check_plugin.py" <<'EOF'
"""pytest plugin of jobs/gpu_check.sh: every test's tmp_path/cache is one shared export cache ($GPU_CHECK_SHARED_CACHE),
so graphs the tests export (and the background worker exported beforehand) are exported once, not once per test."""
import os
from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def _gpu_check_shared_cache(tmp_path):
    shared = os.environ.get("GPU_CHECK_SHARED_CACHE")
    if shared:
        Path(shared).mkdir(parents=True, exist_ok=True)
        (tmp_path / "cache").symlink_to(shared, target_is_directory=True)
    yield
EOF
  local pp="$WORK/shim:$ROOT"  # this checkout first, also where another one is pip-installed
  offline && pp="$WORK/shim:$SITE:$ROOT"
  export PYTHONPATH="$pp${PYTHONPATH:+:$PYTHONPATH}"
  # CUDA libraries of the pip nvidia-* packages (torch's), for onnxruntime's CUDA provider.
  local libs
  libs=$(PYTHONPATH= "$PY" - <<'EOF' 2>/dev/null
import glob, os
try:
    import nvidia
    roots = list(nvidia.__path__)
except ImportError:
    roots = []
dirs = sorted({os.path.dirname(f) for r in roots for f in glob.glob(os.path.join(r, "**", "lib*.so*"), recursive=True)})
print(":".join(dirs))
EOF
)
  [[ -n $libs ]] && export LD_LIBRARY_PATH="$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
}

# -- background exports ---------------------------------------------------------------------------------------------
selected() {
  local w
  if [[ -n $ONLY ]]; then for w in $ONLY; do [[ $w == "$1" ]] && return 0; done; return 1; fi
  for w in $SKIP; do [[ $w == "$1" ]] && return 1; done
  return 0
}
if [[ -z ${GPU_CHECK_PREP_ITEMS:-} ]]; then  # what the selected steps need, in the order they need it
  PREP_ITEMS=""
  { selected engine || selected cli || selected engine-b1; } && PREP_ITEMS+=" htdemucs-fp32"
  selected tests && PREP_ITEMS+=" m-released"
  selected engine-fp16 && PREP_ITEMS+=" htdemucs-fp16"
  { selected roformer || selected roformer-fp16; } && PREP_ITEMS+=" roformer-vocals"
  export GPU_CHECK_PREP_ITEMS=${PREP_ITEMS# }
fi
PREP_ITEMS=$GPU_CHECK_PREP_ITEMS

prepare_item() {
  local item=$1 threads=$2
  case $item in
    htdemucs-fp32) "$PY" jobs/bench.py _child prepare "{\"model\": \"htdemucs\", \"threads\": $threads, \"precision\": \"fp32\"}" ;;
    htdemucs-fp16) "$PY" jobs/bench.py _child prepare "{\"model\": \"htdemucs\", \"threads\": $threads, \"precision\": \"fp16\"}" ;;
    roformer-vocals) "$PY" jobs/bench.py _child prepare '{"roformer": "vocals", "precision": "fp16"}' ;;
    m-released) "$PY" - "$WORK/m-repo" <<'EOF' ;;
# The released-size model tests/gpu builds (make_bag_repo(tmp/"repo", "m", 1, size="released")): same file name,
# same bytes, same sha256, so the tests find its fp32 and fp16 graphs in the shared cache.
import sys
from pathlib import Path
from ripper_dist.export_cache import export_demucs_source, with_precision
from ripper_dist.sources import resolve_demucs
from ripper_export.random_demucs import make_bag_repo
repo = Path(sys.argv[1])
if not (repo / "m.yaml").exists():
    make_bag_repo(repo, "m", 1, size="released")
with_precision(export_demucs_source(resolve_demucs("m", repo=repo)), "fp16")
print("m released: fp32 and fp16 graphs cached")
EOF
  esac
}

prepare_worker() {
  local cores="all $NCPU cores" threads=$NCPU item s
  if ((NCPU >= 8)) && command -v taskset >/dev/null; then  # the whole worker (its children inherit it)
    taskset -pc "$((NCPU / 4))-$((NCPU - 1))" $$ >/dev/null && cores="cores $((NCPU / 4))-$((NCPU - 1))" &&
      threads=$((NCPU - NCPU / 4))
  fi
  for item in $PREP_ITEMS; do
    [[ -e $WORK/prepare.$item.done ]] && continue
    s=$(date +%s)
    echo "--- prepare $item ($cores) $(date -u +%T)"
    if prepare_item "$item" "$threads"; then
      touch "$WORK/prepare.$item.done"; echo "--- prepare $item done in $(($(date +%s) - s)) s"
    else
      touch "$WORK/prepare.$item.failed"; echo "--- prepare $item FAILED after $(($(date +%s) - s)) s"
    fi
  done
  touch "$WORK/prepare.all.done"
}

prepare_alive() { [[ -s $WORK/prepare.pid ]] && kill -0 "$(cat "$WORK/prepare.pid")" 2>/dev/null; }

start_prepare() {
  if [[ -e $WORK/prepare.all.done ]] || prepare_alive; then
    echo "background exports: already $( [[ -e $WORK/prepare.all.done ]] && echo done || echo running) (log $WORK/prepare.log)"
    return
  fi
  rm -f "$WORK"/prepare.*.failed
  [[ -n $PREP_ITEMS ]] || return 0
  local self=$SELF
  if [[ $MODE == start-prepare ]]; then  # the next call may remove this checkout (see "Lent device machines"): copy
    rm -rf "$WORK/src.tmp" && mkdir -p "$WORK/src.tmp" &&
      cp -a "$ROOT"/ripper_dist "$ROOT"/export "$ROOT"/jobs "$ROOT"/pyproject.toml "$WORK/src.tmp/" &&
      { [[ ! -e $ROOT/.gpu_check_commit ]] || cp "$ROOT/.gpu_check_commit" "$WORK/src.tmp/"; } &&
      rm -rf "$WORK/src" && mv "$WORK/src.tmp" "$WORK/src" && self=$WORK/src/jobs/gpu_check.sh
  fi
  setsid nohup bash "$self" --_prepare-worker < /dev/null >> "$WORK/prepare.log" 2>&1 &
  echo $! > "$WORK/prepare.pid"
  echo "background exports started (pid $(cat "$WORK/prepare.pid"), log $WORK/prepare.log): $PREP_ITEMS"
}

wait_prepared() {  # wait_prepared ITEM...: until each is done or failed, or the worker is gone, or the step's time
  local item s=$(date +%s) limit=$1; shift
  for item; do
    while prepare_alive && [[ ! -e $WORK/prepare.$item.done && ! -e $WORK/prepare.$item.failed ]] &&
      (($(date +%s) - s < limit)); do sleep 2; done
  done
  (($(date +%s) - s > 1)) && echo "(waited $(($(date +%s) - s)) s for the background exports: $*)"
  for item; do [[ -e $WORK/prepare.$item.failed ]] && echo "(background export $item failed: this step exports itself)"; done
  return 0
}

if [[ $MODE == worker ]]; then
  setup_env
  prepare_worker
  exit 0
fi

# -- results file -------------------------------------------------------------------------------------------------
if [[ -n ${GPU_CHECK_RESULTS:-} ]]; then RESULTS=$GPU_CHECK_RESULTS
elif [[ -n ${OUT:-} ]]; then RESULTS=$OUT/gpu_check.txt
else RESULTS=$ROOT/gpu_check_results.txt; fi
exec > >(tee -a "$RESULTS") 2>&1
TEE_PID=$!
finish() { exec >&- 2>&-; wait "$TEE_PID" 2>/dev/null; }

echo "##### ripper-dist GPU check, $(date -u '+%Y-%m-%d %H:%M:%S UTC'), mode $MODE, budget ${BUDGET}s, device $DEVICE"
# A snapshot (`git archive`) has no .git of its own: its commit can be written to .gpu_check_commit beside it.
echo "##### repo $ROOT at $(cat "$ROOT/.gpu_check_commit" 2>/dev/null || git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?'); work $WORK; results $RESULTS"
echo "##### command: $0 $ARGS"

if ((INSTALL)); then
  s=$(date +%s)
  if offline; then echo "== install: offline from $WHEELS into $SITE"; ((DRY)) || install_offline
  else echo "== install: pip (online)"; ((DRY)) || install_online || echo "!! pip install failed"; fi
  echo "== install took $(($(date +%s) - s)) s"
fi
setup_env
echo "PYTHONPATH=$PYTHONPATH"
echo "LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}"

if [[ $MODE == start-prepare ]]; then
  ((DRY)) || start_prepare
  sleep 3
  tail -5 "$WORK/prepare.log" 2>/dev/null
  finish
  exit 0
fi

# -- steps --------------------------------------------------------------------------------------------------------
SUMMARY=()

# Foreground pinning while the background exports run: lower quarter of the cores, --threads to match.
FG_PIN=(); FG_THREADS=$NCPU
fg_pin() {
  FG_PIN=(); FG_THREADS=$NCPU
  if prepare_alive && ((NCPU >= 8)) && command -v taskset >/dev/null; then
    FG_PIN=(taskset -c "0-$((NCPU / 4 - 1))"); FG_THREADS=$((NCPU / 4))
  fi
}

run_step() {  # run_step NAME TIMEOUT CMD...
  local name=$1 t=$2 left s rc; shift 2
  left=$((DEADLINE - $(date +%s)))
  if ((left < 30)); then echo "=== [$name] SKIPPED: budget spent"; SUMMARY+=("$name: skipped (budget)"); return; fi
  ((t > left - 10)) && t=$((left - 10))
  echo
  echo "=== [$name] $(date -u +%T) timeout ${t}s ${FG_PIN[*]:+(${FG_PIN[*]}) }: $*"
  if ((DRY)); then SUMMARY+=("$name: dry run"); return; fi
  s=$(date +%s)
  timeout -k 10 "$t" "${FG_PIN[@]}" bash -c '"$@"' "$name" "$@"
  rc=$?
  local what="rc=$rc"
  ((rc == 124 || rc == 137)) && what="TIMED OUT after ${t}s"
  echo "=== [$name] $what in $(($(date +%s) - s)) s"
  SUMMARY+=("$name: $what ($(($(date +%s) - s)) s)")
}

env_check() {
  echo "--- nvidia-smi"
  nvidia-smi 2>&1 || echo "nvidia-smi not available"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1
  echo "--- cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2), $NCPU cores; $(uname -sr)"
  "$PY" - "$DEVICE" <<'EOF'
import importlib, platform, sys
print("python", platform.python_version(), sys.executable)
for name in ("numpy", "torch", "onnx", "onnxruntime", "demucs", "bs_roformer", "ray", "soundfile", "soxr", "pynvml"):
    try:
        m = importlib.import_module(name)
        print(f"{name:12} {getattr(m, '__version__', '?'):24} {getattr(m, '__file__', '')}")
    except Exception as e:  # noqa: BLE001
        print(f"{name:12} NOT IMPORTABLE: {type(e).__name__}: {e}")
try:
    import torch
    print("torch cuda", torch.version.cuda, "available", torch.cuda.is_available(),
          torch.cuda.get_device_name(0) if torch.cuda.is_available() else "", "cudnn", torch.backends.cudnn.version())
except Exception as e:  # noqa: BLE001
    print("torch cuda check failed:", e)
import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
try:
    cuda_build = importlib.import_module("onnxruntime.capi.build_and_package_info").cuda_version
except Exception:  # noqa: BLE001
    cuda_build = "-"
print("onnxruntime", ort.__version__, "device", ort.get_device(), "built for CUDA", cuda_build, ort.__file__)
print("available providers:", ort.get_available_providers())
if "TensorrtExecutionProvider" in ort.get_available_providers():
    import ctypes
    try:
        ctypes.CDLL("libnvinfer.so.10")
        print("TensorRT libraries: libnvinfer.so.10 loads")
    except OSError as e:
        print("TensorRT provider not available: libnvinfer.so.10 does not load (", e, ")")
if sys.argv[1].startswith("cpu"):
    sys.exit(0)
rng = np.random.default_rng(0)
w = rng.standard_normal((512, 512)).astype(np.float32)
k = rng.standard_normal((8, 4, 3)).astype(np.float32)
nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Conv", ["h", "k"], ["y"], pads=[1, 1])]
graph = helper.make_graph(nodes, "check", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 512])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                          [numpy_helper.from_array(w, "w"), numpy_helper.from_array(k, "k")])
model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
model.ir_version = 8
so = ort.SessionOptions()
so.log_severity_level = 3
try:  # the CUDA/cuDNN wheels of the gpu extra, as ripper-dist loads them before its first GPU session
    from ripper_dist.gpu_libs import preload
    print("preloaded from wheels (TensorRT):", preload())
except Exception as e:  # noqa: BLE001
    print("ripper_dist.gpu_libs.preload failed:", e)
try:
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
except Exception as e:  # noqa: BLE001
    print("CUDA SESSION FAILED TO START:", e)
    sys.exit(3)
print("session providers:", sess.get_providers())
x = rng.standard_normal((1, 4, 512)).astype(np.float32)
y = sess.run(None, {"x": x})[0]
h = x @ w
hp = np.pad(h, ((0, 0), (0, 0), (1, 1)))
ref = np.stack([sum(np.convolve(hp[0, c], k[o, c][::-1], "valid") for c in range(4)) for o in range(8)])[None]
err = float(np.abs(y - ref).max() / np.abs(ref).max())
ok = sess.get_providers()[0] == "CUDAExecutionProvider" and err < 1e-2
print(f"CUDA session {'RUNS on the GPU' if ok else 'DOES NOT run on the GPU'}: MatMul+Conv, max rel. error {err:.1e}")
sys.exit(0 if ok else 4)
EOF
  local rc=$?
  echo "--- ripper-dist doctor -d $DEVICE"
  "$PY" -m ripper_dist.cli doctor -d "$DEVICE" || ((rc)) || rc=5
  return $rc
}

bench() {  # bench SUBCOMMAND ARGS...: jobs/bench.py with the step's thread count
  "$PY" jobs/bench.py "$@" --threads "$FG_THREADS"
}

gpu_tests() {
  GPU_CHECK_SHARED_CACHE=$RIPPER_DIST_CACHE "$PY" -m pytest -q tests/gpu -p gpu_check_plugin -o cache_dir="$WORK/pytest-cache" \
    --basetemp="$WORK/pytest-tmp" "$@"
  local rc=$?
  "$PY" -c 'import onnxruntime as o, sys; sys.exit("TensorrtExecutionProvider" not in o.get_available_providers())' 2>/dev/null &&
    ! "$PY" -c 'import ctypes; ctypes.CDLL("libnvinfer.so.10")' 2>/dev/null &&
    echo "note: TensorRT provider not available (onnxruntime lists it, but libnvinfer.so.10 is not on this machine): its test fails"
  return $rc
}

export PY DEVICE WORK NCPU FG_THREADS
export -f env_check bench gpu_tests
((BACKGROUND)) && ! ((DRY)) && start_prepare
for step in $ALL_STEPS; do
  selected "$step" || continue
  fg_pin
  export FG_THREADS
  case $step in
    env) run_step env 90 env_check ;;
    engine) wait_prepared 240 htdemucs-fp32; fg_pin; export FG_THREADS
      run_step engine 240 bench engine --seconds "$SECS" --device "$DEVICE" ;;
    tests) wait_prepared 240 m-released; fg_pin; export FG_THREADS
      run_step tests 300 gpu_tests ;;
    engine-fp16) wait_prepared 180 htdemucs-fp16; fg_pin; export FG_THREADS
      run_step engine-fp16 180 bench engine --seconds "$SECS" --device "$DEVICE" --precision fp16 ;;
    roformer) wait_prepared 300 roformer-vocals; fg_pin; export FG_THREADS
      run_step roformer 300 bench roformer --config vocals --seconds "$RSECS" --device "$DEVICE" ;;
    trt) wait_prepared 180 htdemucs-fp32; fg_pin; export FG_THREADS
      run_step trt 200 bench engine --seconds "$SECS" --device "${DEVICE/cuda/tensorrt}" --no-bare ;;
    trt-fp16) wait_prepared 180 htdemucs-fp16; fg_pin; export FG_THREADS
      run_step trt-fp16 200 bench engine --seconds "$SECS" --device "${DEVICE/cuda/tensorrt}" --precision fp16 --no-bare ;;
    cli) run_step cli 200 "$PY" jobs/bench.py cli --seconds "$SECS" --device "$DEVICE" ;;
    engine-b1) run_step engine-b1 150 bench engine --seconds "$SECS" --device "$DEVICE" --batch-size 1 ;;
    roformer-fp16) wait_prepared 200 roformer-vocals; fg_pin; export FG_THREADS
      run_step roformer-fp16 200 bench roformer --config vocals --seconds "$RSECS" --device "$DEVICE" --precision fp16 ;;
  esac
done

echo
echo "##### background exports (log $WORK/prepare.log):"
grep -- '^--- prepare' "$WORK/prepare.log" 2>/dev/null | tail -n 12
echo "##### summary ($(($(date +%s) - START)) s of ${BUDGET} s):"
printf '  %s\n' "${SUMMARY[@]}"
[[ -n ${OUT:-} && -s $WORK/prepare.log ]] && cp "$WORK/prepare.log" "$OUT/prepare.log"
finish
