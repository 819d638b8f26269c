#!/usr/bin/env bash
# The GPU end-to-end bench (bench/gpu_e2e.py) on a lent GPU machine, which has torch, timm, pandas,
# pyarrow, scipy, scikit-image and scikit-learn but no Ray, and no network.
#
#   bash bench/gpu_e2e.sh prepare   # HERE (network): Ray and the packages the GPU image lacks, for its
#                                   # Python 3.12, pruned and packed into .gpu_site/site.tar.xz (~31 MB)
#   bash bench/gpu_e2e.sh [ARGS]    # THERE (device tool: carry [".gpu_site"]): unpack, check, run
#                                   # gpu_e2e.py; JSON, log and gpu_e2e_logs.tgz (every command's log
#                                   # and run history) go to $OUT (else bench/results)
#
# What is pruned from Ray: its Java jars (31 MiB packed), the dashboard's web client, RLlib and
# Ray LLM: raycell starts no dashboard here and uses neither library. The packed tree keeps the
# working tree within the device tool's 64 MiB.
set -euo pipefail
cd "$(dirname "$0")/.."
SITE_DIR=.gpu_site
PY_VERSION=3.12
# On the GPU image already (KINDS.md, 'Python packages already there'): not carried.
HAVE="numpy pandas pyarrow fsspec click filelock msgpack packaging protobuf pyyaml requests attrs certifi
charset-normalizer charset_normalizer idna urllib3 typing-extensions typing_extensions python-dateutil
python_dateutil six"

if [[ "${1:-}" == "prepare" ]]; then
  ray_req=$(grep -o '"ray\[[^"]*' pyproject.toml | sed 's/^"//; s/\[[^]]*\]//; s/\.\*$/.0/')
  py=${PYTHON:-python3}
  tmp=$(mktemp -d)
  echo "gpu_e2e prepare: $ray_req[data,train,tune] for cp${PY_VERSION/./} into $tmp"
  $py -m pip download -q --only-binary=:all: --python-version $PY_VERSION --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$tmp/w" \
      "ray[data,train,tune]==${ray_req#ray==}"
  mkdir -p "$tmp/site"
  for w in "$tmp"/w/*.whl; do
    name=$(basename "$w" | cut -d- -f1 | tr 'A-Z' 'a-z')
    if [[ " $(echo $HAVE | tr 'A-Z' 'a-z') " == *" $name "* ]]; then continue; fi
    echo "  carry $(basename "$w")"
    (cd "$tmp/site" && unzip -q -o "$w")
  done
  rm -rf "$tmp"/site/ray/jars "$tmp"/site/ray/dashboard/client/build "$tmp"/site/ray/rllib \
         "$tmp"/site/ray/llm
  mkdir -p "$SITE_DIR"
  tar -C "$tmp/site" -cf - . | xz -T0 -6 > "$SITE_DIR/site.tar.xz"
  rm -rf "$tmp"
  du -h "$SITE_DIR/site.tar.xz"
  echo "now, with the device tool: run(command='bash bench/gpu_e2e.sh', carry=['$SITE_DIR'], timeout_s=600)"
  exit 0
fi

# ---- on the GPU machine
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
if ! $PY -c "import ray" 2>/dev/null; then
  [[ -f $SITE_DIR/site.tar.xz ]] || { echo "no Ray and no $SITE_DIR/site.tar.xz: run 'bash bench/gpu_e2e.sh prepare' here and carry $SITE_DIR"; exit 2; }
  $PY -c "import tarfile; tarfile.open('$SITE_DIR/site.tar.xz').extractall('/tmp/site', filter='tar')"
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
$PY - <<'EOF'
import importlib
missing = []
for m in ("ray", "ray.train.torch", "ray.data", "torch", "timm", "sklearn", "scipy", "skimage", "pyarrow",
          "pandas", "yaml", "raycell.train.trainer", "raycell.train.loop", "raycell.infer.embed",
          "raycell.data.synthetic"):
    try:
        importlib.import_module(m)
    except Exception as exc:  # noqa: BLE001
        missing.append(f"{m}: {type(exc).__name__}: {exc}")
print("gpu_e2e.sh: imports " + ("ok" if not missing else "FAILED:\n  " + "\n  ".join(missing)))
raise SystemExit(1 if missing else 0)
EOF
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
set -o pipefail
rc=0
$PY bench/gpu_e2e.py --out "$OUT/gpu_e2e.json" "$@" 2>&1 | tee "$OUT/gpu_e2e.log" || rc=$?
# every command's log, the nvidia-smi samples and each run's history (no checkpoints) in one file
out_abs=$(cd "$OUT" && pwd)
work=/tmp/raycell_gpu_e2e
[[ -d $work ]] && (cd $work && { ls ./*.log ./*.csv 2>/dev/null; find runs \( -name history.jsonl \
    -o -name config.yaml -o -name failure.txt \) 2>/dev/null; } | tar -czf "$out_abs/gpu_e2e_logs.tgz" -T -) || true
exit $rc
