#!/usr/bin/env bash
# docs/results.md, "ML10 on two CPU cores (issue 37)": the in-context agent sized for a 2-core CPU, end to
# end on the ML10-holdout validation protocol (recipe chosen without the test split). Every stage resumes:
# kill it and rerun this script, finished work is reused. Budget per stage: docs/ml10.md (session 18:
# 172.4 CPU-min for seed 0, made under other names: studies/ml10-cpu-s0-norm and -norm-dagger; session 19:
# 86.8 CPU-min for seed 1 with 4 relabelling rounds, on a machine ~2.8x faster per CPU-second).
#   bash scripts/reproduce_ml10_cpu.sh            # SEED=0 by default; SEED=1 bash ... for another seed
set -euo pipefail
cd "$(dirname "$0")/.."
SEED=${SEED:-0}
K=3            # decision interval: the expert keeps its success best at 3 (results/expert-ml10-k)
OUT=${OUT:-studies/ml10-cpu-s$SEED}
# REACH_FIX=1 (session 34; to try on validation): the scripted expert of reach-v3 is told the goal raised by the
#    hand-TCP offset (suites.MEASURED_GOAL_OFFSETS), so its labels park the finger centre at the goal instead of
#    4.5 mm inside the 5 cm success radius; the histories carry the setting and the relabelling rounds inherit it.
#    Everything goes to its own directory (default studies/ml10-cpu-sSEED-reach)
GEN_EXTRA=""
if [ "${REACH_FIX:-0}" = 1 ]; then
  GEN_EXTRA="--expert-goal-offsets reach-v3=0,0,0.045"
  [ "$OUT" = "studies/ml10-cpu-s$SEED" ] && OUT="studies/ml10-cpu-s$SEED-reach"
fi
export OMP_NUM_THREADS=1
# RELABEL_WORKERS=2 plays each relabelling round's trials in two processes (the same data, byte for byte; session
# 32): for a run that has the machine to itself
RW="--relabel-workers ${RELABEL_WORKERS:-1}"

# 1. histories: 800 trials x 4 episodes of 500 simulator steps on ML10-holdout's 8 train environments,
#    a new task per trial, the expert told a goal perturbed by up to 15 cm (a level drawn per episode)
#    and every executed action perturbed by Gaussian noise of sd 0.3 (DART; the labels stay the expert's)
icl-metarl generate --suite ML10-holdout --split train --task-pool fresh --trials 800 --episodes 4 \
  --episode-length 500 --action-repeat $K --noise-kind goal --noise-schedule random --noise-max 0.15 \
  --action-noise 0.3 --trials-per-shard 25 --workers 2 --seed $SEED $GEN_EXTRA --out "$OUT/histories"

# 2. pretraining: the compact context (earlier episodes by every 10th decision and their last), whole
#    4-episode trials as windows, acting on trials of up to 13 episodes, observations standardised by
#    the data's statistics (session 18: 0.50 against 0.28 without)
#    KEEP_BEST=1 (session 31, tried on validation): each earlier episode also keeps its best-rewarded step
#    (--context-keep-best); every agent of steps 2-4 gets the suffix -best, the histories are shared
MODEL="--context-stride 10 --episodes-per-window 4 --context-episodes 13 --d-model 96 --n-layer 3 --n-head 4 --batch-size 16 --normalize-obs"
B=""
if [ "${KEEP_BEST:-0}" = 1 ]; then MODEL="$MODEL --context-keep-best"; B="-best"; fi
#    WIDE=1 (session 32 pretraining, session 33 rounds; tried on validation): d = 128, 4 layers (0.82M parameters
#    against 0.35M); every agent of steps 2-4 gets the suffix -d128, the histories are shared
if [ "${WIDE:-0}" = 1 ]; then MODEL="${MODEL/--d-model 96 --n-layer 3/--d-model 128 --n-layer 4}"; B="$B-d128"; fi
icl-metarl train icl --data "$OUT/histories" --out "$OUT/pretrain-norm$B" --resume --seed $SEED $MODEL \
  --steps 1200 --lr 1e-3 --warmup-steps 50 --checkpoint-every 100 --keep-checkpoints 20 --log-every 20 --threads 1

# 3. two relabelling rounds: the agent plays 320 trials of new train tasks exploring in episode 1, the
#    expert labels every step, 400 steps on base + rounds after each (session 18: 0.52, context +0.08)
icl-metarl train icl --data "$OUT/histories" --out "$OUT/pretrain-norm-dagger$B" --resume --seed $SEED $MODEL \
  --init-from "$OUT/pretrain-norm$B" --relabel-rounds 2 $RW --relabel-from-init --relabel-trials 320 --relabel-new-tasks \
  --explore-episodes 1 --explore-scale 0.25 --steps 800 --lr 5e-4 --warmup-steps 20 --checkpoint-every 100 \
  --keep-checkpoints 20 --log-every 20 --threads 1

# 3b. two more relabelling rounds from the 2-round agent on its own data (session 19, seed 1: 0.62 against
#    0.52 after 2 rounds, paired +0.10 [+0.02, +0.18]). As measured, these rounds draw their tasks with
#    the same round seeds as rounds 1-2 (seed + 1000 x round), so they replay rounds 1-2's task draws
#    with the better agent. Skipped under STEP_ROUNDS=1 (3d replaces these two rounds; the 4-round agent is built by
#    a run without it, which can go beside it on the other core once step 3 is done)
D="$OUT/pretrain-norm-dagger$B"
[ "${STEP_ROUNDS:-0}" = 1 ] || icl-metarl train icl --data "$OUT/histories" "$D/round-1/relabelled" "$D/round-2/relabelled" \
  --out "$OUT/pretrain-norm-dagger4$B" --resume --seed $SEED $MODEL \
  --init-from "$D" --relabel-rounds 2 $RW --relabel-from-init --relabel-trials 320 --relabel-new-tasks \
  --explore-episodes 1 --explore-scale 0.25 --steps 800 --lr 5e-4 --warmup-steps 20 --checkpoint-every 100 \
  --keep-checkpoints 20 --log-every 20 --threads 1

# 3c (SELF_IMITATION=1, session 24; tried on seed 0, no gain, not chosen: docs/ml10.md): rounds 3-4 with self-imitation labels instead: once an episode of a
#    relabelled trial succeeds, later episodes are labelled with its actions (replay repeats a success exactly),
#    the expert's labels elsewhere; then AGENT=pretrain-norm-dagger-si for step 4
if [ "${SELF_IMITATION:-0}" = 1 ]; then
  icl-metarl train icl --data "$OUT/histories" "$D/round-1/relabelled" "$D/round-2/relabelled" \
    --out "$OUT/pretrain-norm-dagger-si" --resume --seed $SEED $MODEL \
    --init-from "$D" --relabel-rounds 2 $RW --relabel-from-init --relabel-trials 320 --relabel-new-tasks --relabel-self-imitation \
    --explore-episodes 1 --explore-scale 0.25 --steps 800 --lr 5e-4 --warmup-steps 20 --checkpoint-every 100 \
    --keep-checkpoints 20 --log-every 20 --threads 1
fi
# 3d (STEP_ROUNDS=1, session 26; to try on validation): rounds 3-4 whose trials explore the way the test split's
#    acting rule does (session 25): a fresh pre-squash perturbation of scale 0.5 at every decision of episodes 1-3
#    of each relabelled trial, the 4th played as it would exploit, the expert labelling every step. Round 3 is
#    played by the 2-round agent with this run's exploration (--relabel-init-explores), round 4 by round 3's.
#    Then compare on 10 + 3 episodes with the session-25 acting rule against the recipe's 4-round agent:
#    EVAL_K10=1 AGENT=pretrain-norm-dagger-step bash scripts/reproduce_ml10_cpu.sh  (and AGENT=pretrain-norm-dagger4)
if [ "${STEP_ROUNDS:-0}" = 1 ]; then
  icl-metarl train icl --data "$OUT/histories" "$D/round-1/relabelled" "$D/round-2/relabelled" \
    --out "$OUT/pretrain-norm-dagger-step" --resume --seed $SEED $MODEL \
    --init-from "$D" --relabel-rounds 2 $RW --relabel-from-init --relabel-init-explores --relabel-trials 320 \
    --relabel-new-tasks --explore-episodes 3 --explore-kind step --explore-scale 0.5 --steps 800 --lr 5e-4 \
    --warmup-steps 20 --checkpoint-every 100 --keep-checkpoints 20 --log-every 20 --threads 1
fi
# 3e (BEST_ROUNDS=1, session 31; tried on validation): rounds 3-4 as the recipe's (3b), from the same 2-round agent,
#    but trained and played with each earlier episode's best-rewarded step kept (--context-keep-best: a mask, the
#    weights carry over); round 3 is played by the 2-round agent as in 3b. Then
#    EVAL_K10=1 AGENT=pretrain-norm-dagger4-bestrounds bash scripts/reproduce_ml10_cpu.sh
if [ "${BEST_ROUNDS:-0}" = 1 ]; then
  icl-metarl train icl --data "$OUT/histories" "$D/round-1/relabelled" "$D/round-2/relabelled" \
    --out "$OUT/pretrain-norm-dagger4-bestrounds" --resume --seed $SEED $MODEL --context-keep-best \
    --init-from "$D" --relabel-rounds 2 $RW --relabel-from-init --relabel-trials 320 --relabel-new-tasks \
    --explore-episodes 1 --explore-scale 0.25 --steps 800 --lr 5e-4 --warmup-steps 20 --checkpoint-every 100 \
    --keep-checkpoints 20 --log-every 20 --threads 1
fi
# 3h (SPREAD_ROUNDS=1, session 34; tried on validation): rounds 3-4 as the recipe's (3b), from the same 2-round agent,
#    trained and played with each earlier episode keeping 4 more steps, its highest-rewarded ones spread in time over
#    ties at the top (--context-keep-best --context-best-steps 4): reach, push and pick-place pay a flat maximum inside
#    the success region, so these span it and carry its centre (session 33). Round 3 is played by the 2-round agent
#    as in 3b. Then EVAL_K10=1 AGENT=pretrain-norm-dagger4-spread4 bash scripts/reproduce_ml10_cpu.sh
if [ "${SPREAD_ROUNDS:-0}" = 1 ]; then
  icl-metarl train icl --data "$OUT/histories" "$D/round-1/relabelled" "$D/round-2/relabelled" \
    --out "$OUT/pretrain-norm-dagger4-spread4" --resume --seed $SEED $MODEL --context-keep-best --context-best-steps 4 \
    --init-from "$D" --relabel-rounds 2 $RW --relabel-from-init --relabel-trials 320 --relabel-new-tasks \
    --explore-episodes 1 --explore-scale 0.25 --steps 800 --lr 5e-4 --warmup-steps 20 --checkpoint-every 100 \
    --keep-checkpoints 20 --log-every 20 --threads 1
fi
# 3f (MORE_ROUNDS=1, session 32; tried on validation): rounds 5-6 from the recipe's 4-round agent, as rounds 3-4 were
#    played and trained, on tasks no earlier round drew (--relabel-first-round 5: seeds + 5000 and + 6000; rounds 3-4
#    replayed rounds 1-2's draws). Beside it (3g, STEPS_ONLY=1) the control: the 4-round agent trained 800 more
#    steps on its own data, no new trials. Then EVAL_K10=1 AGENT=pretrain-norm-dagger6 (and -dagger4-steps)
D4="$OUT/pretrain-norm-dagger4$B"
DATA4=("$OUT/histories" "$D/round-1/relabelled" "$D/round-2/relabelled" "$D4/round-1/relabelled" "$D4/round-2/relabelled")
if [ "${MORE_ROUNDS:-0}" = 1 ]; then
  icl-metarl train icl --data "${DATA4[@]}" --out "$OUT/pretrain-norm-dagger6$B" --resume --seed $SEED $MODEL \
    --init-from "$D4" --relabel-rounds 2 $RW --relabel-from-init --relabel-trials 320 --relabel-new-tasks \
    --relabel-first-round 5 --explore-episodes 1 --explore-scale 0.25 --steps 800 --lr 5e-4 --warmup-steps 20 \
    --checkpoint-every 100 --keep-checkpoints 20 --log-every 20 --threads 1
fi
if [ "${STEPS_ONLY:-0}" = 1 ]; then
  icl-metarl train icl --data "${DATA4[@]}" --out "$OUT/pretrain-norm-dagger4-steps$B" --resume --seed $SEED $MODEL \
    --init-from "$D4" --explore-episodes 1 --explore-scale 0.25 --steps 800 --lr 5e-4 --warmup-steps 20 \
    --checkpoint-every 100 --keep-checkpoints 20 --log-every 20 --threads 1
fi
# 4b (EVAL_K10=1): the test protocol's 10 adaptation + 3 evaluation episodes on the validation split, acting as the
#    second set of test seeds does (exploring at every decision of episodes 1-10, scale 0.5); context wiped beside it
if [ "${EVAL_K10:-0}" = 1 ]; then
  icl-metarl evaluate "$OUT/${AGENT:-pretrain-norm-dagger4$B}" --non-adaptive --suite ML10 --split validation \
    --tasks-per-env 5 -K 10 -E 3 --seeds 0 --action-repeat $K --batch-size 25 --vector pipelined \
    --explore-episodes 10 --explore-kind step --explore-scale 0.5 \
    --out "$OUT/eval-validation-k10-step05-${AGENT:-pretrain-norm-dagger4$B}"
  exit 0
fi
# 4. validation: ML10's validation split (new goals of all 10 train environments; window-open and
#    basketball were held out of this agent's training), 3 adaptation + 1 evaluation episodes
AGENT=${AGENT:-pretrain-norm-dagger4$B}
icl-metarl evaluate "$OUT/$AGENT" random oracle --non-adaptive --suite ML10 --split validation \
  --tasks-per-env 5 -K 3 -E 1 --seeds 0 --action-repeat $K --batch-size 25 --vector pipelined --out "$OUT/eval-validation-$AGENT"
