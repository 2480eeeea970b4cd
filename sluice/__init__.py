"""Sluice: one scheduling-aware front door for embedding, reranker and LLM services on Triton."""

__version__ = "0.1.0"
