#!/usr/bin/env bash
# Issue 35, "confirmation on untouched tasks": the reach-v3 and push-v3 recipes of docs/results.md ("Same
# information, same budget"), frozen as they stand, rerun on benchmark seed SUITE_SEED (default 1), whose 50
# test goals no run of this project has looked at. Per training seed (0, 1, 2, fixed before any figure):
#   reach (50-step episodes): the in-context agent of the quickstart (its generate and pretrain stages),
#       maml-imitate (the best gradient learner on reach at the matched budget) and Reptile (3 inner steps),
#       each gradient learner trained until its validation success stops improving (at least 640 iterations);
#   push (100-step episodes): the matched in-context recipe (400 goal-noise + 200 uniform-noise trials, 3,000
#       steps cut by 2 hand-over rounds: 400k env steps, 320k labels), meta-sgd-imitate (the best gradient
#       learner on push) and Reptile, each until stopped (at least 320 iterations).
# Validation (choices) and test (played once, after the three seeds are trained) are the splits of SUITE_SEED.
# Every stage resumes: kill it and rerun, finished work is reused. ENV=reach|push, SEED=0|1|2; once all three
# seeds of an ENV are trained, STAGE=test plays the test split once and writes results/ml1-ENV-confirm-test.
#   ENV=reach SEED=0 bash scripts/reproduce_ml1_confirm.sh ; ... SEED=1, SEED=2 ; ENV=reach STAGE=test bash ...
# A seed whose training may not survive until the other seeds are trained (studies/ is not kept between sittings)
# plays the test split on its own, once, right after its training: STAGE=test SEEDS=0 writes
# results/ml1-ENV-confirm-test-s0; `icl-metarl compare` pools the three per-seed directories as it pools one.
# Smoke-test sizes (not the recipe): ITERS=4 MIN_ITERS=2 EVERY=2 TASKS=2 QS_SIZE=tiny PUSH_TRIALS=4 PUSH_STEPS=6.
# Budget (issue-22 measurements, session 7-13 machines): reach ~12 (in-context) + 8-16 + 8-11 CPU-min per seed,
# push ~24 + 14 + 10-14, plus the validation curves. Smoke-tested end to end at the sizes above (reach and push,
# three seeds, then STAGE=test, session 20). Run at the recipe sizes: reach, three seeds (session 29, ~40 wall-min
# per seed on one core), and push, three seeds (sessions 29-30, ~55-60 wall-min per seed on one core):
# docs/results.md, "Confirmation on untouched tasks".
set -euo pipefail
cd "$(dirname "$0")/.."
ENV=${ENV:-reach}; SEED=${SEED:-0}; SUITE_SEED=${SUITE_SEED:-1}; STAGE=${STAGE:-train}
TASKS=${TASKS:-50}; EVERY=${EVERY:-80}
OUT=${OUT:-studies/ml1-confirm-ss$SUITE_SEED/$ENV}
export OMP_NUM_THREADS=1
case "$ENV" in
  reach) SUITE=ML1:reach-v3; LEN=50;  ITERS=${ITERS:-1280}; MIN_ITERS=${MIN_ITERS:-640}; BEST=maml-imitate ;;
  push)  SUITE=ML1:push-v3;  LEN=100; ITERS=${ITERS:-960};  MIN_ITERS=${MIN_ITERS:-320}; BEST=meta-sgd-imitate ;;
  *) echo "ENV=$ENV: expected reach or push" >&2; exit 2 ;;
esac
ICL="$OUT/icl-s$SEED"

if [ "$STAGE" = train ]; then
  if [ "$ENV" = reach ]; then
    mkdir -p "$OUT"
    printf '{"suite_seed": %s}\n' "$SUITE_SEED" > "$OUT/quickstart-suite-seed.json"
    icl-metarl quickstart --config "$OUT/quickstart-suite-seed.json" ${QS_SIZE:+--size "$QS_SIZE"} --seed "$SEED" \
      --stages generate pretrain --out "$OUT/qs-s$SEED"
    ln -sfn "qs-s$SEED/icl" "$ICL"
  else
    PT=${PUSH_TRIALS:-400}
    GEN="--suite $SUITE --suite-seed $SUITE_SEED --task-pool fresh --episodes 4 --episode-length $LEN --trials-per-shard 50 --workers 1"
    icl-metarl generate $GEN --trials "$PT" --noise-kind goal --noise-schedule random --noise-max 0.15 \
      --seed $((31 + 10 * SEED)) --out "$OUT/data/rand-s$SEED"
    icl-metarl generate $GEN --trials $((PT / 2)) --noise-kind uniform --noise-max 1.0 \
      --seed $((41 + 10 * SEED)) --out "$OUT/data/unif-s$SEED"
    icl-metarl train icl --data "$OUT/data/rand-s$SEED" "$OUT/data/unif-s$SEED" --out "$ICL" --resume \
      --steps "${PUSH_STEPS:-3000}" --batch-size 16 --d-model 64 --n-layer 3 --episodes-per-window 4 --threads 1 \
      --relabel-rounds 2 --relabel-trials $((PT / 2)) --relabel-handover 2 --explore-episodes 0 --explore-scale 0 \
      --checkpoint-every 500 --seed "$SEED"
  fi
  for L in "$BEST" reptile; do
    status=0
    icl-metarl train "$L" --suite "$SUITE" --suite-seed "$SUITE_SEED" --task-pool fresh --episode-length $LEN \
      --meta-batch 10 --checkpoint-every "$EVERY" --seed "$SEED" --out "$OUT/$L-s$SEED" --iterations "$ITERS" \
      --until-stopped "$OUT/curves-$L-s$SEED" --every "$EVERY" --min-iterations "$MIN_ITERS" \
      -K 3 -E 1 --seeds 0 --tasks "$TASKS" || status=$?
    [ "$status" = 0 ] || [ "$status" = 3 ] || exit "$status"   # 3: still improving at --iterations (said so)
  done
  exit 0
fi

# STAGE=test: each gradient run's snapshot chosen on validation, the in-context agents as trained; played once.
chosen() {  # the snapshot curves.json chose for run $1 (its curves in $2)
  python -c 'import json, sys; print(json.load(open(sys.argv[2] + "/curves.json"))["chosen"][sys.argv[1]]["point"])' "$1" "$2"
}
SEEDS=${SEEDS:-0 1 2}
AGENTS=()
for S in $SEEDS; do AGENTS+=("$OUT/icl-s$S"); done
for L in "$BEST" reptile; do
  for S in $SEEDS; do AGENTS+=("$OUT/$L-s$S/snapshots/$(chosen "$OUT/$L-s$S" "$OUT/curves-$L-s$S")"); done
done
if [ "$SEEDS" = "0 1 2" ]; then RESULTS=${RESULTS:-results/ml1-$ENV-confirm-test}
else RESULTS=${RESULTS:-results/ml1-$ENV-confirm-test-s${SEEDS// /-}}; fi
icl-metarl evaluate "${AGENTS[@]}" random oracle --non-adaptive --suite "$SUITE" --split test --task-seed "$SUITE_SEED" \
  -K 3 -E 1 --episode-length $LEN --seeds 0 --tasks "$TASKS" --out "$RESULTS"
gzip -9 -n -f "$RESULTS/results.json"  # committed compressed; every reader takes results.json.gz as well
for A in "${AGENTS[@]}"; do  # each agent's budget and configuration beside the figures (issue 35)
  D="$RESULTS/agents/$(echo "${A#"$OUT"/}" | tr / _)"; mkdir -p "$D"
  for F in budget.json config.json; do if [ -f "$A/$F" ]; then cp "$A/$F" "$D/$F"; fi; done
done
# The figures: in-context against its wiped variant, and against the best gradient learner, pooled over seeds:
#   icl-metarl compare RESULTS --a icl "icl #2" "icl #3" --against-non-adaptive --episode 3
#   icl-metarl compare RESULTS --a icl "icl #2" "icl #3" --b <the three BEST agents' names in report.md> --episode 3
