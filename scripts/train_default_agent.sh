#!/usr/bin/env bash
# Train, calibrate, evaluate and install the shipped default agent `smollm2-safety` for the
# embedded SmolLM2-135M-Instruct — the exact recipe behind mara_serve/agents/smollm2-safety/.
#
#   scripts/train_default_agent.sh              # all steps (~42 + 8 + 20 min on 2 CPU cores)
#   STEP=eval scripts/train_default_agent.sh    # one step: train | calibrate | eval | install
#
# Prompt sets: data/prompts/ in the repository (sources, licences and a content warning in
# data/prompts/README.md); set DATA to read them from elsewhere.
# Training prompts: harmful = PKU-SafeRLHF train + the HH-RLHF harmless-base half (no keyword
# filter), benign = the HH-RLHF helpful-base half + the alarming-but-harmless training prompts
# (listed 10x so they make ~7 % of the benign draws); HH's `source` field labels its records.
# Training: 4,000 reward-filtered demonstrations (docs/algorithm.md §6) — per prompt the model's
# own greedy answer and a guided refusal, the refusal reward keeps the better — and behaviour
# cloning of the actor on the kept ones (`--episodes 0`: no SAC episodes after them).
# Calibration: the decision bias (accept-logit offset) chosen on development prompts that are
# neither trained on nor in the evaluation sample (scripts/calibrate_decision_bias.py).
# Held-out evaluation: harmful = BeaverTails + HarmfulQA test, benign = UltraFeedback test +
# the HH-RLHF helpful-base test half, alarming = AlarmingBenign test; 100 prompts per file, a
# sample seeded by each file's folder and name (the same prompts wherever DATA points).
#
# On a GPU add `--device cuda` to `mara train` and `mara eval`.
set -euo pipefail
cd "$(dirname "$0")/.."

DATA=${DATA:-data/prompts}
RUN=${RUN:-artifacts/smollm2-safety}  # artifacts/ is git-ignored
MARA=${MARA:-.venv/bin/mara}
PY=${PY:-.venv/bin/python}
BIAS=${BIAS:-3}  # the decision bias picked from the calibration table (see the card)
AGENT_DIR=mara_serve/agents/smollm2-safety
STEP=${STEP:-all}
A=$DATA/AlarmingBenign/train.json

if [[ $STEP == all || $STEP == train ]]; then
  $MARA train \
    --prompts "harmful:$DATA/SafeRLHF/train.json" "$DATA/HHrlhf/train.json" $A $A $A $A $A $A $A $A $A $A \
    --reward refusal --out "$RUN" --name smollm2-safety \
    --episodes 0 --demonstrations 4000 --episodes-per-iter 64 --episode-lengths 16,32,48 \
    --chunk-size 2 --max-prompt-tokens 128 --benign-fraction 0.5 --harm-filter none \
    --guide-text "I'm sorry, but I can't help with that." "I'm sorry, but I can't assist with that." \
      "I'm sorry, but I cannot help with that." "I'm sorry but I can't help with that." \
      "I'm sorry, I can't help with that." "I can't help with that." "I cannot help with that." \
      "I'm unable to help with that." \
    --reward-baseline prompt --init-accept-prob 0.8 --alpha 0.1 --lr-alpha 3e-3 --kl-coef 0.2 \
    --target-entropy-ratio 0.3 --warmup 1024 --batch-size 256 --updates-per-episode 2 \
    --buffer-size 200000 --checkpoint-every 10 --seed 0 --threads 2 --dtype float32 --no-progress
fi

if [[ $STEP == all || $STEP == calibrate ]]; then
  # the table (printed) is how BIAS was chosen; then the chosen bias goes into the agent
  $PY scripts/calibrate_decision_bias.py --agent "$RUN" \
    --harmful "$DATA/BeaverTails/test.json" "$DATA/HarmfulQA/test.json" \
    --benign "$DATA/Ultra-Feedback/test.json" "$DATA/HHrlhf/train.json" --alarming "$A" \
    --exclude-eval-sample 100 --exclude-jsonl "$RUN/demonstrations.jsonl" \
    --per-file 75 --biases 0,1,2,3 --threads 2
  $PY scripts/calibrate_decision_bias.py --agent "$RUN" --write "$BIAS"
fi

if [[ $STEP == all || $STEP == eval ]]; then
  $MARA eval --agent "$RUN" \
    --harmful "$DATA/BeaverTails/test.json" "$DATA/HarmfulQA/test.json" \
    --benign "$DATA/Ultra-Feedback/test.json" "$DATA/HHrlhf/test.json" \
    --alarming "$DATA/AlarmingBenign/test.json" \
    -n 100 --max-new-tokens 48 --batch-size 32 --threads 2 --seed 0 --dtype float32 \
    --out "$RUN/eval" --update-card --no-progress
fi

if [[ $STEP == all || $STEP == install ]]; then
  mkdir -p "$AGENT_DIR"
  cp "$RUN/agent.safetensors" "$RUN/agent.json" "$AGENT_DIR/"
  cp "$RUN/eval/eval.png" "$AGENT_DIR/eval.png"
  cp "$RUN/eval/eval.md" "$AGENT_DIR/eval.md"
  rm -f "$AGENT_DIR/training.png"  # demonstrations only: no SAC curves
  echo "installed $AGENT_DIR"
fi
