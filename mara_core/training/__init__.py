"""Training and evaluation of MARA agents (MARA_SPEC.md §6).

- `data`      prompt files → labelled `Prompt`s, the harm-keyword filter, the episode sampler
- `refusal`   the refusal and degenerate-output detectors (a documented pattern set)
- `rewards`   the `(prompt, response) -> float` reward interface and its three plug-ins
- `episodes`  stochastic episodes through the batched `LLMEngine` → SAC transitions
- `replay`    the replay buffer of cached candidate states
- `sac`       discrete soft actor-critic (twin critics, soft targets, learned temperature)
- `trainer`   the training loop: collect, reward, store, update, log, checkpoint, resume
- `metrics`   the metrics log (JSONL + CSV); `plots` the PNG charts
- `evaluate`  base vs aligned on held-out prompts: refusal, over-refusal, length, perplexity
- `train_cmd`/`eval_cmd`  the `mara train` / `mara eval` command bodies

Nothing here changes how the engine decodes: episodes run through `LLMEngine` with a
per-episode agent wrapper (`episodes.EpisodeAgent`).
"""
