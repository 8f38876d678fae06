"""MARA Serve: an OpenAI-compatible server that aligns an LLM at decoding time with MARA agents.

Packages: `engine` (token ids in, token ids out), `training` (mara train / eval), `server` (the
OpenAI API), `cli` (the `mara` command), `agents` (the shipped default agent).
"""

__version__ = "0.1.0"
