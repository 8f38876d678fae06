"""Training and evaluation of MARA agents (docs/algorithm.md §6, §9).

- `data`      prompt files → labelled `Prompt`s, the harm-keyword filter, the episode sampler
- `refusal`   the refusal and degenerate-output detectors (a documented pattern set)
- `rewards`   the `(prompt, response) -> float` reward interface, its three plug-ins, and
              the per-prompt baseline
- `episodes`  stochastic (optionally guided) episodes through the batched `LLMEngine` → SAC
              transitions
- `replay`    the replay buffer of cached candidate states
- `sac`       discrete soft actor-critic (twin critics, soft targets, learned temperature)
- `trainer`   the training loop: collect, reward, store, update, log, checkpoint, resume
- `checkpoint` the run directory: checkpoint files, the agent card, the exported agent
- `metrics`   the metrics and samples logs (JSONL + CSV); `plots` the PNG charts
- `evaluate`  base vs aligned on held-out prompts: refusal, over-refusal, length, perplexity

Nothing here decodes on its own: episodes run through `LLMEngine` with a per-episode agent
wrapper (`episodes.EpisodeAgent`), using two opt-in engine hooks for training agents —
`fallback_last` (all rejected → the last candidate) and `sees_candidates` (the agent is told
the candidate tokens, for guided exploration).
"""
