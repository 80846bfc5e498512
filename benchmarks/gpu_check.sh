#!/usr/bin/env bash
# Every GPU check of benchmarks/GPU.md in one device call (the lent machine's 15 minutes
# of device time hold one start and one call of at most 600 s, not two).
#
#   run(command="bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=600)
#
# Steps, most valuable first, each under its own `timeout` (seconds) so that a slow one
# cannot take the others' results with it; each writes its log to $OUT as it goes and
# $OUT/steps.log says how each ended (rc 124: its limit).  Worst case 575 s.
#   install  60  the carried wheels (.whl: nibabel, array-api-compat, isal) and aslcal
#   info     25  CuPy imported with warnings as errors, `aslcal info`
#   tests   150  pytest -m gpu
#   cohort  215  bench_cohort: GPU fitting and 16-core CPU fitting, 2 and 8 workers,
#                the two int16 cohorts, 3 rounds -> gpu-cohort.json (rows as they come)
#   fit     125  bench_fit -m gpu (the CUDA sweep to 1e7 voxels) -> gpu-fit.json
# At most 8 files come back: steps.log and the seven above, all in $OUT (no *.tmp left).
set -u -o pipefail
: "${OUT:?run this on the device machine, where OUT is set}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."

step() {  # step NAME LIMIT COMMAND...: run it, log to $OUT/NAME.log, never stop the script
    local name=$1 limit=$2 t0=$SECONDS rc
    shift 2
    echo "== $name (limit ${limit}s) started at +${t0}s" >> "$OUT/steps.log"
    timeout --kill-after=5 "$limit" "$@" > "$OUT/$name.log" 2>&1
    rc=$?
    echo "== $name rc=$rc after $((SECONDS - t0))s" >> "$OUT/steps.log"
    return $rc
}

export PYTHONPATH=/tmp/site
step install 60 bash -c '
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
    python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . || exit 1
    python3 -c "import aslcal, aslcal.kernels.lm, nibabel, isal, array_api_compat; print(aslcal.__version__, nibabel.__version__)"' ||
    {   # aslcal.kernels lives in ./kernels (pyproject package-dir): src alone cannot import it
        ln -sfn ../../kernels src/aslcal/kernels
        export PYTHONPATH=/tmp/site:$PWD/src
        echo "== install failed: src (and kernels linked into it) on PYTHONPATH" >> "$OUT/steps.log"; }

step info 25 bash -c 'python3 -W error -c "import cupy; print(\"cupy\", cupy.__version__, cupy.arange(3).sum())"
    python3 -W error -c "from numba import cuda; print(\"numba.cuda available:\", cuda.is_available())"
    python3 -m aslcal info'

# A third-party deprecation must not stop a step (conftest and bench_fit probe numba.cuda at
# import, under the suite's warnings-as-errors): shown in the warnings summary instead.
LENIENT=(-W default::DeprecationWarning -W default::PendingDeprecationWarning -W default::FutureWarning)
step tests 150 python3 -m pytest tests -m gpu -q -rfE --durations=15 -p no:cacheprovider "${LENIENT[@]}"

step cohort 215 env ASLCAL_BENCH_RECORD="$OUT/gpu-cohort.json" ASLCAL_BENCH_COHORT_BACKEND=cuda,numba \
    ASLCAL_BENCH_COHORT_WORKERS=2,8 ASLCAL_BENCH_COHORT_NOISE=snr50-int16,snr50-int16-30pairs \
    ASLCAL_BENCH_COHORT_ROUNDS=3 \
    python3 -m pytest benchmarks/bench_cohort.py --benchmark-enable -q -p no:cacheprovider -W default

step fit 125 env ASLCAL_BENCH_RECORD="$OUT/gpu-fit.json" \
    python3 -m pytest benchmarks/bench_fit.py --benchmark-enable -m gpu -k cuda -q -p no:cacheprovider -W default

rm -f "$OUT"/*.tmp  # a record rewrite cut by a step's limit: a 9th file would push one out
echo "== done at +${SECONDS}s" >> "$OUT/steps.log"
# The same essentials in the call's output_tail, in case $OUT's files do not come back.
cat "$OUT/steps.log"
for f in install info tests cohort fit; do echo "---- $f.log (end)"; tail -c 1800 "$OUT/$f.log" 2>/dev/null; echo; done
exit 0
