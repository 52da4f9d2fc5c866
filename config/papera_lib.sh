# What config/papera_synthmath.sh needs around its steps (sourced, not run): the scale switch, where data, runs
# and results go, the time budget, and the helpers that run a step with its log and time. Sets SCALE (gpu, cpu or
# smoke), PY, RESULTS, RUNS, DATA, DEV, T0; defines elapsed, left, run and bench (bench also needs BUDGET_S, PROMPTS
# and NEW).
case "${1:-}" in
  "") SCALE=gpu ;;
  --cpu) SCALE=cpu ;;
  --smoke) SCALE=smoke ;;
  *) echo "error: unknown option $1 (expected --cpu, --smoke or nothing)" >&2; exit 2 ;;
esac
PY=${PYTHON:-python}
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1
case $SCALE in
  gpu) RESULTS=${RESULTS:-results/papera}; RUNS=out/papera; DATA=data/papera_synthmath; DEV=cuda ;;
  cpu) RESULTS=${RESULTS:-results/papera_cpu}; RUNS=out/papera_cpu; DATA=data/papera_synthmath; DEV=cpu ;;
  smoke) RESULTS=${RESULTS:-out/papera_smoke/results}; RUNS=out/papera_smoke; DATA=data/papera_smoke; DEV=cpu ;;
esac
T0=$(date +%s)
elapsed() { echo $(( $(date +%s) - T0 )); }
left() { echo $(( BUDGET_S - $(elapsed) )); }

# run NAME CMD...: CMD's output to $RESULTS/NAME.log, its last lines and its time on the screen. Returns 1 on failure
# (which stops the script in the foreground), 2 when a `timeout` in CMD stopped it at the end of the budget
run() {
  local name=$1 t=$(date +%s) rc=0; shift
  "$@" > "$RESULTS/$name.log" 2>&1 || rc=$?
  if (( rc == 124 )); then echo "OUT OF TIME: $name stopped at $(elapsed) s"; return 2; fi
  if (( rc )); then tail -20 "$RESULTS/$name.log"; echo "FAILED: $name (log: $RESULTS/$name.log)"; return 1; fi
  # progress bars end their updates with carriage returns; the bench JSON line is kept apart
  tr '\r' '\n' < "$RESULTS/$name.log" | grep -v -e '^{' -e 'it/s' -e 's/it' -e '^ *$' | tail -3 || true
  echo "== $name: $(( $(date +%s) - t )) s (total $(elapsed) s)"
}

# bench NAME ARGS...: a bench run on the test problems whose JSON (its last line) is kept as $RESULTS/bench_NAME.json;
# stopped when the budget is spent (then no JSON: bench writes it at the end), not started with under a minute left
bench() {
  local name=$1; shift
  if (( $(left) < 60 )); then echo "skipped: bench_$name, $(left) s of the budget left"; return 0; fi
  run "bench_$name" timeout "$(left)" "$PY" bench.py --prompts "$DATA/test_prompts.jsonl" --num_prompts "$PROMPTS" \
    --max_new_tokens "$NEW" --device "$DEV" --dtype float32 --json "$@" || return
  grep "^{" "$RESULTS/bench_$name.log" | tail -1 > "$RESULTS/bench_$name.json"
}
