"""OpenAI wire types (pydantic), named as in the OpenAI API reference, plus MARA extensions.

Requests own their conversion to engine parameters (`to_sampling_params`). Non-OpenAI fields
(`top_k`, `ignore_eos`, `stop_token_ids`, `mara_trace`) are grouped in `MaraExtensions` and
documented with `Field(description=...)`; the openai SDK sends them through `extra_body`.
"""
