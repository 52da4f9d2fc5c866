# What config/papera_synthmath.sh and config/papera_ablations.sh share (sourced, not run): the --smoke switch, where
# data, runs and results go, and the helpers that run a step with its log and time. Sets SMOKE, PY, RESULTS, RUNS,
# DATA, DEV; defines elapsed, run and bench.
SMOKE=0
case "${1:-}" in
  --smoke) SMOKE=1 ;;
  "") ;;
  *) echo "error: unknown option $1 (expected --smoke or nothing)" >&2; exit 2 ;;
esac
PY=${PYTHON:-python}
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1
if (( SMOKE )); then
  RESULTS=${RESULTS:-out/papera_smoke/results}; RUNS=out/papera_smoke; DATA=data/papera_smoke; DEV=cpu
else
  RESULTS=${RESULTS:-results/papera}; RUNS=out/papera; DATA=data/papera_synthmath; DEV=cuda
fi
T0=$(date +%s)
elapsed() { echo $(( $(date +%s) - T0 )); }

# run NAME CMD...: CMD's output to $RESULTS/NAME.log, its last lines and its time on the screen; stops on failure
run() {
  local name=$1 t=$(date +%s); shift
  if ! "$@" > "$RESULTS/$name.log" 2>&1; then
    tail -20 "$RESULTS/$name.log"; echo "FAILED: $name (log: $RESULTS/$name.log)"; exit 1
  fi
  grep -v '^{' "$RESULTS/$name.log" | tail -3 || true     # the bench JSON line is kept apart
  echo "== $name: $(( $(date +%s) - t )) s (total $(elapsed) s)"
}

# bench NAME ARGS...: a bench run on the test problems whose JSON (its last line) is kept as $RESULTS/bench_NAME.json
bench() {
  local name=$1; shift
  run "bench_$name" "$PY" bench.py --prompts "$DATA/test_prompts.jsonl" --max_new_tokens "$NEW" --device "$DEV" \
    --dtype float32 --json "$@"
  grep "^{" "$RESULTS/bench_$name.log" | tail -1 > "$RESULTS/bench_$name.json"
}
