"""mara_core: the MARA decoding engine (token ids in, token ids out; no web imports)."""

__version__ = "0.1.0"
