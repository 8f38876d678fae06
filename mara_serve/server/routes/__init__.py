"""Thin FastAPI routers, one per resource: parse, call serving, return JSON or SSE."""
