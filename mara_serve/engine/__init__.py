"""The MARA decoding engine: token ids in, token ids out.

It imports nothing from the server, the CLI, training or benchmarks. `loading` gives a
`LoadedModel`; `engine.LLMEngine` runs continuous batching over `runner.ModelRunner` with the
MARA step (`step.py`); `async_engine.AsyncEngine` puts it on its own thread for asyncio callers.
"""
