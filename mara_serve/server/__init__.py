"""MARA Serve's HTTP server: an OpenAI-compatible API over the `mara_serve.engine`.

A request's path through the package: `routes` (thin FastAPI routers) → `protocol` (OpenAI wire
types) → `serving` (template, detokenizer, stop strings, SSE) → the engine's `AsyncEngine`.
`app.create_app(settings, engine=None)` builds an app; `mara_serve.cli` is the `mara` command.
"""
