"""Tensor names and types of each service type: the contract between the compiler (config.pbtxt), the runtimes
(model.py) and every client (the gateway, tritonclient users).

Every tensor has one row per request in the batch dimension (``max_batch_size > 0``), so ``dims`` below exclude
it. Names are lower case, as in Triton's own LLM backends (``text_input`` / ``text_output``), so Triton's
``generate`` endpoint takes them as JSON keys.
"""

from __future__ import annotations

from typing import NamedTuple


class Tensor(NamedTuple):
    name: str
    data_type: str  # model_config.proto DataType, without the TYPE_ prefix
    dims: tuple[int, ...]
    optional: bool = False


EMBEDDING_INPUTS = (Tensor("text", "STRING", (1,)),)
EMBEDDING_OUTPUTS = (
    Tensor("embedding", "FP32", (-1,)),
    Tensor("tokens", "INT32", (1,)),  # tokens the model saw (after truncation), for usage
    Tensor("truncated", "BOOL", (1,)),  # the text was longer than max_length
)

RERANKER_INPUTS = (Tensor("query", "STRING", (1,)), Tensor("document", "STRING", (1,)))
RERANKER_OUTPUTS = (
    Tensor("score", "FP32", (1,)),
    Tensor("tokens", "INT32", (1,)),
    Tensor("truncated", "BOOL", (1,)),
)

# A request carries either text_input (a prompt) or messages (a JSON list of {"role", "content"}).
LLM_INPUTS = (
    Tensor("text_input", "STRING", (1,), optional=True),
    Tensor("messages", "STRING", (1,), optional=True),
    Tensor("max_tokens", "INT32", (1,), optional=True),
    Tensor("temperature", "FP32", (1,), optional=True),
    Tensor("top_p", "FP32", (1,), optional=True),
    Tensor("seed", "INT64", (1,), optional=True),
    Tensor("stop", "STRING", (1,), optional=True),  # JSON list of stop strings
)
# One response per piece of text; the last one (flag FINAL) has finish_reason set and empty text.
LLM_OUTPUTS = (
    Tensor("text_output", "STRING", (1,)),
    Tensor("finish_reason", "STRING", (1,)),  # "" until the end, then stop | length | cancelled | timeout
    Tensor("prompt_tokens", "INT32", (1,)),
    Tensor("completion_tokens", "INT32", (1,)),
)

SIGNATURES: dict[str, tuple[tuple[Tensor, ...], tuple[Tensor, ...]]] = {
    "embedding": (EMBEDDING_INPUTS, EMBEDDING_OUTPUTS),
    "reranker": (RERANKER_INPUTS, RERANKER_OUTPUTS),
    "llm": (LLM_INPUTS, LLM_OUTPUTS),
}
