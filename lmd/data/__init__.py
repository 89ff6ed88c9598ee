"""Data sources: image sources, the Parquet latent store, its Ray Data stream, and in-memory latents."""

from lmd.data.memory import InMemoryLatents, synthetic_latents

__all__ = ["InMemoryLatents", "synthetic_latents"]
