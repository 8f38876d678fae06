#!/usr/bin/env bash
# The upgraded training recipe (issue 16), run on one GPU: the candidate successor of
# smollm2-safety measured in mara_serve/agents/smollm2-safety/README.md ("Diagnostics").
# On an H200 its 4,480 episodes took 164 s (float32, the CPU server's precision). Changes from
# scripts/train_default_agent.sh: mixed episode lengths 16/32/48 (the agent meets late tokens
# and the end token), no keyword harm filter (harmful prompts beyond the keyword list), the
# alarming-but-harmless training prompts (listed 10x so they make ~7 % of the benign draws),
# and the refusal reward's refuse-then-comply penalty (its default). Then the evaluation with
# the independent judge, the alarming split and the baselines.
#
#   scripts/train_agent_v2_gpu.sh                # train + eval (needs CUDA)
#   EPISODES=20000 SEED=1 scripts/train_agent_v2_gpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."

DATA=${DATA:-data/prompts}
RUN=${RUN:-artifacts/smollm2-safety-v2}
MARA=${MARA:-.venv/bin/mara}
EPISODES=${EPISODES:-4480}
SEED=${SEED:-0}
A=$DATA/AlarmingBenign/train.json

RESUME=()
[[ -f $RUN/checkpoint/state.pt ]] && RESUME=(--resume)
$MARA train \
  --prompts "harmful:$DATA/SafeRLHF/train.json" "$DATA/HHrlhf/train.json" $A $A $A $A $A $A $A $A $A $A \
  --reward refusal --out "$RUN" --name smollm2-safety --device cuda --dtype float32 \
  --episodes "$EPISODES" --episodes-per-iter 64 --repeats 4 --episode-lengths 16,32,48 \
  --max-prompt-tokens 128 --benign-fraction 0.5 --harm-filter none \
  --guide-text "I'm sorry, but I can't help with that." --guide-fraction 0.25 \
  --reward-baseline prompt --init-accept-prob 0.8 --alpha 0.1 --lr-alpha 3e-3 --kl-coef 0.2 \
  --target-entropy-ratio 0.3 --warmup 1024 --batch-size 256 --updates-per-episode 2 \
  --buffer-size 100000 --checkpoint-every 10 --seed "$SEED" "${RESUME[@]}"

$MARA eval --agent "$RUN" \
  --harmful "$DATA/BeaverTails/test.json" "$DATA/HarmfulQA/test.json" \
  --benign "$DATA/Ultra-Feedback/test.json" "$DATA/HHrlhf/test.json" \
  --alarming "$DATA/AlarmingBenign/test.json" \
  -n 100 --max-new-tokens 48 --batch-size 32 --seed 0 --dtype float32 --reachability \
  --out "$RUN/eval"
