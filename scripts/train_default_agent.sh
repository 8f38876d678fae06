#!/usr/bin/env bash
# Train, evaluate and install the shipped default agent `smollm2-safety` for the embedded
# SmolLM2-135M-Instruct — the exact recipe behind mara_serve/agents/smollm2-safety/.
#
#   scripts/train_default_agent.sh            # train (~35 min on 2 CPU cores), eval (~20 min), install
#   STEP=eval scripts/train_default_agent.sh  # re-run only the evaluation of a finished run
#
# Prompt sets: data/prompts/ in the repository (sources, licences and a content warning in
# data/prompts/README.md); set DATA to read them from elsewhere.
# Training prompts: harmful = PKU-SafeRLHF train + the HH-RLHF harmless-base half, benign = the
# HH-RLHF helpful-base half; HH's `source` field labels its records, and the keyword harm
# filter drops harmful-labelled prompts that name no harmful intent
# (mara_serve/training/data.py). Reward: the built-in refusal reward.
# Held-out evaluation: harmful = BeaverTails + HarmfulQA test, benign = UltraFeedback test +
# the HH-RLHF helpful-base test half; 100 prompts per file, a sample seeded by each file's
# folder and name (the same prompts wherever DATA points).
#
# On a GPU add `--device cuda` to both commands and raise --episodes (and --max-new-tokens)
# freely: episodes are batched, so a GPU runs the paper-scale defaults of `mara train`.
set -euo pipefail
cd "$(dirname "$0")/.."

DATA=${DATA:-data/prompts}
RUN=${RUN:-artifacts/smollm2-safety}  # artifacts/ is git-ignored
MARA=${MARA:-.venv/bin/mara}
AGENT_DIR=mara_serve/agents/smollm2-safety
STEP=${STEP:-all}

if [[ $STEP == all || $STEP == train ]]; then
  RESUME=()
  [[ -f $RUN/checkpoint/state.pt ]] && RESUME=(--resume)
  $MARA train \
    --prompts "harmful:$DATA/SafeRLHF/train.json" "$DATA/HHrlhf/train.json" \
    --reward refusal \
    --out "$RUN" --name smollm2-safety \
    --episodes 2880 --episodes-per-iter 32 --repeats 4 --max-new-tokens 16 --chunk-size 2 \
    --max-prompt-tokens 128 --benign-fraction 0.5 --harm-filter keywords \
    --guide-text "I'm sorry, but I can't help with that." --guide-fraction 0.25 \
    --reward-baseline prompt --init-accept-prob 0.8 --alpha 0.1 --lr-alpha 3e-3 --kl-coef 0.2 \
    --target-entropy-ratio 0.3 \
    --warmup 1024 --batch-size 256 --updates-per-episode 2 \
    --checkpoint-every 5 --seed 0 --threads 1 --dtype float32 "${RESUME[@]}"
fi

if [[ $STEP == all || $STEP == eval ]]; then
  $MARA eval --agent "$RUN" \
    --harmful "$DATA/BeaverTails/test.json" "$DATA/HarmfulQA/test.json" \
    --benign "$DATA/Ultra-Feedback/test.json" "$DATA/HHrlhf/test.json" \
    -n 100 --max-new-tokens 48 --batch-size 32 --threads 2 --seed 0 --dtype float32 \
    --out "$RUN/eval" --update-card
fi

if [[ $STEP == all || $STEP == install ]]; then
  mkdir -p "$AGENT_DIR"
  cp "$RUN/agent.safetensors" "$RUN/agent.json" "$AGENT_DIR/"
  cp "$RUN/training.png" "$AGENT_DIR/training.png"
  cp "$RUN/eval/eval.png" "$AGENT_DIR/eval.png"
  cp "$RUN/eval/eval.md" "$AGENT_DIR/eval.md"
  echo "installed $AGENT_DIR"
fi
