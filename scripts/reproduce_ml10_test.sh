#!/usr/bin/env bash
# Prepared in session 19; smoke-tested end to end at the tiny sizes below in session 20 (5 test tasks); not yet run
# at the recipe's sizes. For
# docs/ml10.md, "The ML10 test table": one training seed of the final CPU recipe retrained on the full ML10
# benchmark (its 10 train environments; ML10-holdout's test split is refused), the supervision-matched
# gradient learner at the same env-step budget, and the test split played once for this seed: 5 test
# environments x 10 tasks, evaluation seeds 0 1 2, 10 adaptation + 3 evaluation episodes. The three training
# seeds (0, 1, 2) were fixed with the recipe, before any test figure; each seed's test evaluation is written
# to results/ml10-test-sS (in-context and wiped) and results/ml10-test-sS-maml-imitate, and `icl-metarl compare`
# pools them (runs, then tasks).
# Every stage resumes: kill it and rerun this script, finished work is reused.
#   SEED=0 bash scripts/reproduce_ml10_test.sh     # then random and the oracle, once, into results/ml10-test-baselines
#   STAGE=baselines bash scripts/reproduce_ml10_test.sh   # only random and the oracle (they need no training)
# ICL_ACT: how the in-context agent acts on the test split (extra `icl-metarl evaluate` options; empty for seeds
# 0-2). The second set of training seeds (3, 4, 5, fixed in session 25 before any of their figures) plays the acting
# rule chosen on validation then (docs/ml10.md, "Session 25"): a fresh pre-squash perturbation of scale 0.5 at every
# decision of the 10 adaptation episodes, replay-best read from the same records:
#   SEED=3 ICL_ACT="--explore-episodes 10 --explore-kind step --explore-scale 0.5" bash scripts/reproduce_ml10_test.sh
# The third set (6, 7, 8, fixed in session 34 before any of their figures) is trained by the same commands with the
# code of session 34 on: its checkpoints give episodes 5-13 of a trial the 4th episode's embedding (trained_episodes,
# chosen on validation: docs/ml10.md, "Session 34"); maml-imitate's seeds 3-5 are its comparison:
#   SEED=6 GRADIENT_LEARNER=0 ICL_ACT="--explore-episodes 10 --explore-kind step --explore-scale 0.5" bash scripts/reproduce_ml10_test.sh
# Sizes can be shrunk for a smoke test (TRIALS=8 RELABEL=4 STEPS=20 ROUND_STEPS=20 ITERS=2 TASKS=1 SEEDS=0 K_EP=2 E_EP=1);
# the recipe is the defaults. Per-environment budget as on ML10-holdout (100 trials and 40 relabelled trials
# per train environment, the same passes over the data): 1,000 trials, 4 x 400 relabelled, 1,500 + 2 x 1,000 steps.
set -euo pipefail
cd "$(dirname "$0")/.."
SEED=${SEED:-0}
K=3
# SUITE=ML45: the same recipe at the same per-environment budget on ML45's 45 train environments
SUITE=${SUITE:-ML10}
case "$SUITE" in
  ML10) ENVS=10 ;;
  ML45) ENVS=45 ;;
  *) echo "SUITE=$SUITE: allowed ML10 or ML45" >&2; exit 2 ;;
esac
TRIALS=${TRIALS:-$((100 * ENVS))}; RELABEL=${RELABEL:-$((40 * ENVS))}
STEPS=${STEPS:-$((150 * ENVS))}; ROUND_STEPS=${ROUND_STEPS:-$((100 * ENVS))}
# maml-imitate: 10 tasks x 2 episodes x 500 steps an iteration; on ML10, 520 = the 4-round agent's 5.2M env steps
# (1,000 x 4 x 500 + 4 x 400 x 4 x 500); with ROUNDS=2, ITERS=360 matches its 3.6M
ITERS=${ITERS:-$((52 * ENVS))}
TASKS=${TASKS:-10}; SEEDS=${SEEDS:-0 1 2}; K_EP=${K_EP:-10}; E_EP=${E_EP:-3}
NAME=$(echo "$SUITE" | tr "[:upper:]" "[:lower:]")
OUT=${OUT:-studies/$NAME-test-s$SEED}
RESULTS=${RESULTS:-results/$NAME-test-s$SEED}
export OMP_NUM_THREADS=1
EVAL="--suite $SUITE --split test --tasks-per-env $TASKS -K $K_EP -E $E_EP --seeds $SEEDS --action-repeat $K --batch-size 25 --vector pipelined"
# Random and the oracle need no training: played once, on the same test tasks and evaluation seeds, in a
# results directory of their own (`icl-metarl compare` pairs them with any seed's agents by task).
# BASELINES=1 plays them after the agents (the default with SEED=0); STAGE=baselines plays only them.
baselines() {
  icl-metarl evaluate random oracle $EVAL --out "${BASELINE_RESULTS:-results/$NAME-test-baselines}"
}
if [ "${STAGE:-all}" = baselines ]; then baselines; exit 0; fi

# The gradient learner (chosen on validation: results/ml10-mi-s0-validation against results/ml10-msi-s0-validation)
# trains, then plays the test split with and without its adaptation step, on one core beside the in-context
# stages (one thread each; two cores in all), into a results directory of its own; its log goes to its folder.
gradient() {
  icl-metarl train maml-imitate --suite "$SUITE" --task-pool fresh --action-repeat $K --meta-batch 10 --iterations "$ITERS" \
    --checkpoint-every 40 --seed "$SEED" --threads 1 --out "$OUT/maml-imitate"
  if [ "${STAGE:-all}" = train ]; then return; fi
  icl-metarl evaluate "$OUT/maml-imitate" --non-adaptive $EVAL --out "$RESULTS-maml-imitate"
  cp "$OUT/maml-imitate/budget.json" "$RESULTS-maml-imitate/maml-imitate-budget.json"
  cp "$OUT/maml-imitate/config.json" "$RESULTS-maml-imitate/maml-imitate-config.json"
}
# GRADIENT_LEARNER=0 (session 34, seeds 6-8): no gradient learner for this seed; its comparison is maml-imitate's seeds 3-5
GRADIENT=""
if [ "${GRADIENT_LEARNER:-1}" = 1 ]; then
  mkdir -p "$OUT/maml-imitate"
  gradient > "$OUT/maml-imitate/stdout.log" 2>&1 &
  GRADIENT=$!
fi

icl-metarl generate --suite "$SUITE" --split train --task-pool fresh --trials "$TRIALS" --episodes 4 \
  --episode-length 500 --action-repeat $K --noise-kind goal --noise-schedule random --noise-max 0.15 \
  --action-noise 0.3 --trials-per-shard 25 --workers 2 --seed "$SEED" --out "$OUT/histories"

MODEL="--context-stride 10 --episodes-per-window 4 --context-episodes 13 --d-model 96 --n-layer 3 --n-head 4 --batch-size 16 --normalize-obs"
icl-metarl train icl --data "$OUT/histories" --out "$OUT/pretrain-norm" --resume --seed "$SEED" $MODEL \
  --steps "$STEPS" --lr 1e-3 --warmup-steps 50 --checkpoint-every 100 --keep-checkpoints 3 --log-every 20 --threads 1
icl-metarl train icl --data "$OUT/histories" --out "$OUT/icl" --resume --seed "$SEED" $MODEL \
  --init-from "$OUT/pretrain-norm" --relabel-rounds 2 --relabel-from-init --relabel-trials "$RELABEL" --relabel-new-tasks \
  --explore-episodes 1 --explore-scale 0.25 --steps "$ROUND_STEPS" --lr 5e-4 --warmup-steps 20 --checkpoint-every 100 \
  --keep-checkpoints 3 --log-every 20 --threads 1

# Rounds 3-4 (stage 3b of scripts/reproduce_ml10_cpu.sh, chosen on validation: docs/ml10.md, session 20): two more
# rounds from the 2-round agent on its own data; ROUNDS=2 stops after the first two.
AGENT="$OUT/icl"
if [ "${ROUNDS:-4}" = 4 ]; then
  icl-metarl train icl --data "$OUT/histories" "$OUT/icl/round-1/relabelled" "$OUT/icl/round-2/relabelled" \
    --out "$OUT/icl4" --resume --seed "$SEED" $MODEL --init-from "$OUT/icl" --relabel-rounds 2 --relabel-from-init \
    --relabel-trials "$RELABEL" --relabel-new-tasks --explore-episodes 1 --explore-scale 0.25 --steps "$ROUND_STEPS" \
    --lr 5e-4 --warmup-steps 20 --checkpoint-every 100 --keep-checkpoints 3 --log-every 20 --threads 1
  AGENT="$OUT/icl4"
fi

# STAGE=train stops before any test episode (a cost measurement: python scripts/stage_costs.py "$OUT")
if [ "${STAGE:-all}" != train ]; then
  icl-metarl evaluate "$AGENT" --non-adaptive $EVAL ${ICL_ACT:-} --out "$RESULTS"
  cp "$AGENT/budget.json" "$RESULTS/icl-budget.json"
  cp "$AGENT/config.json" "$RESULTS/icl-config.json"
fi
[ -z "$GRADIENT" ] || wait $GRADIENT || { echo "maml-imitate failed: see $OUT/maml-imitate/stdout.log" >&2; exit 1; }
if [ "${STAGE:-all}" = train ]; then exit 0; fi

if [ "${BASELINES:-$([ "$SEED" = 0 ] && echo 1 || echo 0)}" = 1 ]; then baselines; fi
