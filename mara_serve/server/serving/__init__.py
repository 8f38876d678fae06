"""Serving: OpenAI requests → engine requests → OpenAI responses and SSE chunks.

The text pipeline of one choice (`generation.ChoiceState`): token ids → incremental
detokenizer (never half a UTF-8 character) → stop strings (never the stop text) → deltas.
`Generation` admits all choices of a request together and merges their streams; `chat` and
`completion` turn its deltas into wire objects.
"""
