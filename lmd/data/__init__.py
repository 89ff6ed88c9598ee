"""Data sources for training: latents held in memory (this package grows a Parquet store later)."""

from lmd.data.memory import InMemoryLatents, synthetic_latents

__all__ = ["InMemoryLatents", "synthetic_latents"]
