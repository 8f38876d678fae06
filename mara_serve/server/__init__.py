"""MARA Serve's HTTP server: an OpenAI-compatible API over the `mara_core` engine.

A request's path through the package: `routes` (thin FastAPI routers) → `protocol` (OpenAI wire
types) → `serving` (template, detokenizer, stop strings, SSE) → `mara_core`'s `AsyncEngine`.
`app.create_app(settings, engine=None)` builds an app; `cli.main` is the `mara` command.
"""
