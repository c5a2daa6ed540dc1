#!/usr/bin/env bash
# A lent GPU's work as one unattended command (make gpu-session OUT=DIR), sized for a device lease whose
# commands run at most 600 s: the GPU run (gpu_suite.sh), then backend="auto"'s table from its results
# (bench.auto_backend), then the tile and launch-option sweep (bench.tune) in the time left. All lands flat in
# OUT_DIR: the run's .jsonl, .log, .md and .png, auto_backend.json and tuned_configs.json (both going on
# from the committed tables in lfm_kernels/); commit the run under bench/results/ and the two tables under
# lfm_kernels/. Budget from the command's start: $GPU_SESSION_BUDGET_S (default 540 s), of which
# the run gets $GPU_SUITE_BUDGET_S (default 420 s). Installs nothing, needs no network.
export GPU_SUITE_START="${GPU_SUITE_START:-$(date +%s.%N)}"
out="${1:?usage: bash bench/gpu_session.sh OUT_DIR}"
case "$out" in /*) ;; *) out="$PWD/$out" ;; esac  # relative to where the command was given
cd "$(dirname "$0")/.." || exit 1
python="$(bash bench/gpu_python.sh gpu-session)" || exit 1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$out" || exit 1
bash bench/gpu_suite.sh --out "$out" --budget-s "${GPU_SUITE_BUDGET_S:-420}"
suite_rc=$?
status=0
for table in auto_backend.json tuned_configs.json; do  # both go on from the committed tables
    if [ -f "lfm_kernels/$table" ] && [ ! -f "$out/$table" ]; then
        cp "lfm_kernels/$table" "$out/$table"
    fi
done
run="$(ls -t "$out"/*.jsonl 2>/dev/null | head -n 1)"  # this run's results (the newest)
if [ -n "$run" ]; then
    "$python" -m bench.auto_backend "$run" --table "$out/auto_backend.json" || status=1
fi
left="$("$python" -c "import sys, time; print(max(0, int(float(sys.argv[1]) - (time.time() - float(sys.argv[2])))))" \
    "${GPU_SESSION_BUDGET_S:-540}" "$GPU_SUITE_START")"
"$python" -m bench.tune --budget-s "$left" --table "$out/tuned_configs.json" || status=1
[ "$suite_rc" -ne 0 ] && exit "$suite_rc"
exit "$status"
