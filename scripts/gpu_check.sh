#!/usr/bin/env bash
# The one prepared GPU run (issue 5): install the carried wheels, run the GPU-marked tests, then the benchmark
# matrix (baseline and every memory profile, with and without prior preservation) on the full SD 2.1 base
# architecture at 512 px. Runs from the repository root with `.whl` carried; results land in $OUT.
# Budget: under 8 minutes in all. The optional torch.compile row runs only if enough time is left.
#
#   device run:  bash scripts/gpu_check.sh          (carry: .whl; timeout_s 540)
#   dry run on CPU: BENCH_ARGS="--model builtin:tiny --resolution 32 --steps 1" COMPILE_ROW=0 bash scripts/gpu_check.sh
#   wheels here: python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#                  --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
#                  -d .whl diffusers==0.42.1 bitsandbytes==0.50.2 importlib_metadata
set -uo pipefail
OUT="${OUT:-gpu-check}"
mkdir -p "$OUT"
start=$SECONDS
left() { echo $((465 - (SECONDS - start))); }  # seconds left of the 8 minutes, less a margin for the copy back

if ! ls .whl/*.whl >/dev/null 2>&1; then
  echo "no wheels in .whl/: download them first (see the top of this script)" | tee "$OUT/env.txt"
  exit 1
fi
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || { echo "wheel install failed" | tee "$OUT/env.txt"; exit 1; }
export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 DIFFUSERS_VERBOSITY=error TRANSFORMERS_VERBOSITY=error
export TOKENIZERS_PARALLELISM=false

{
  nvidia-smi
  python3 -c "import torch, diffusers, transformers, accelerate, bitsandbytes as b; \
print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__, \
'accelerate', accelerate.__version__, 'bitsandbytes', b.__version__, '|', torch.cuda.get_device_name())"
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

# GPU-marked tests (they skip without CUDA elsewhere).
timeout 100 python3 -m pytest -m gpu -q -p no:cacheprovider tests >"$OUT/gpu-tests.log" 2>&1
echo "gpu tests exit $?" >>"$OUT/gpu-tests.log"
tail -n 5 "$OUT/gpu-tests.log"

# The matrix at 512 px: builtin:sd21 (exact SD 2.1 base, random weights), 3 warm-up + 10 timed steps per row.
# shellcheck disable=SC2086  # BENCH_ARGS is a list of options
timeout "$(left)" python3 -m dreambooth.cli bench --out "$OUT/bench.json" --table "$OUT/bench.md" ${BENCH_ARGS:-} \
  >"$OUT/bench.log" 2>&1
echo "bench exit $?" >>"$OUT/bench.log"
if [ ! -s "$OUT/bench.md" ] && [ -s "$OUT/bench.json" ]; then  # cut short: the table of the rows written so far
  python3 -c "import json, sys; from dreambooth.bench import format_table; \
print(format_table(json.load(open(sys.argv[1]))))" "$OUT/bench.json" >"$OUT/bench.md" 2>>"$OUT/bench.log"
fi
tail -n 40 "$OUT/bench.log"

# torch.compile of the UNet: measured, not assumed; compilation takes a minute or two, so only with time left.
if [ "${COMPILE_ROW:-1}" = 1 ] && [ "$(left)" -gt 150 ]; then
  # shellcheck disable=SC2086
  timeout "$(left)" python3 -m dreambooth.cli bench --rows default,default+compile --prior on --no-sampling \
    --out "$OUT/bench-compile.json" --table "$OUT/bench-compile.md" ${BENCH_ARGS:-} >"$OUT/bench-compile.log" 2>&1
  echo "compile bench exit $?" >>"$OUT/bench-compile.log"
  tail -n 12 "$OUT/bench-compile.log"
else
  echo "compile row skipped: $(left) s left" | tee "$OUT/bench-compile.log"
fi
echo "total $((SECONDS - start)) s"
