"""The REST gateway in front of Triton: OpenAI- and rerank-compatible routes, plus what Triton does not do (rate
limits, item caching, end-to-end deadlines), configured per service by the compiled repository's sluice.json."""
