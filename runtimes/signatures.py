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


# Tensor names, each written once: the tuples below use them, and so do clients that address tensors by name (the
# gateway; tests/test_tensor_contract.py checks what it sends and reads against SIGNATURES).
TEXT, EMBEDDING = "text", "embedding"  # embedding
QUERY, DOCUMENT, SCORE = "query", "document", "score"  # reranker
TOKENS, TRUNCATED = "tokens", "truncated"  # embedding and reranker
TEXT_INPUT, MESSAGES, MAX_TOKENS, TEMPERATURE, TOP_P, SEED, STOP = (  # llm inputs
    "text_input", "messages", "max_tokens", "temperature", "top_p", "seed", "stop"
)
TEXT_OUTPUT, FINISH_REASON, PROMPT_TOKENS, COMPLETION_TOKENS = (  # llm outputs
    "text_output", "finish_reason", "prompt_tokens", "completion_tokens"
)

EMBEDDING_INPUTS = (Tensor(TEXT, "STRING", (1,)),)
EMBEDDING_OUTPUTS = (
    Tensor(EMBEDDING, "FP32", (-1,)),
    Tensor(TOKENS, "INT32", (1,)),  # tokens the model saw (after truncation), for usage
    Tensor(TRUNCATED, "BOOL", (1,)),  # the text was longer than max_length
)

RERANKER_INPUTS = (Tensor(QUERY, "STRING", (1,)), Tensor(DOCUMENT, "STRING", (1,)))
RERANKER_OUTPUTS = (
    Tensor(SCORE, "FP32", (1,)),
    Tensor(TOKENS, "INT32", (1,)),
    Tensor(TRUNCATED, "BOOL", (1,)),
)

# A request carries either text_input (a prompt) or messages (a JSON list of {"role", "content"}).
LLM_INPUTS = (
    Tensor(TEXT_INPUT, "STRING", (1,), optional=True),
    Tensor(MESSAGES, "STRING", (1,), optional=True),
    Tensor(MAX_TOKENS, "INT32", (1,), optional=True),
    Tensor(TEMPERATURE, "FP32", (1,), optional=True),
    Tensor(TOP_P, "FP32", (1,), optional=True),
    Tensor(SEED, "INT64", (1,), optional=True),
    Tensor(STOP, "STRING", (1,), optional=True),  # JSON list of stop strings
)
# One response per piece of text; the last one (flag FINAL) has finish_reason set and empty text.
LLM_OUTPUTS = (
    Tensor(TEXT_OUTPUT, "STRING", (1,)),
    Tensor(FINISH_REASON, "STRING", (1,)),  # "" until the end, then stop | length | cancelled | timeout
    Tensor(PROMPT_TOKENS, "INT32", (1,)),
    Tensor(COMPLETION_TOKENS, "INT32", (1,)),
)

SIGNATURES: dict[str, tuple[tuple[Tensor, ...], tuple[Tensor, ...]]] = {
    "embedding": (EMBEDDING_INPUTS, EMBEDDING_OUTPUTS),
    "reranker": (RERANKER_INPUTS, RERANKER_OUTPUTS),
    "llm": (LLM_INPUTS, LLM_OUTPUTS),
}


def output_names(service_type: str) -> tuple[str, ...]:
    """Every output of ``service_type``, in the contract's order: what a client asks Triton for."""
    return tuple(tensor.name for tensor in SIGNATURES[service_type][1])

# A request parameter, not a tensor: the wall-clock moment (integer microseconds since the epoch, time.time()) by
# which the request's batch must start. A runtime refuses a request whose start-by has passed, uncomputed
# ("Request timeout expired"). The gateway sets it on every embedding and rerank request; direct clients may.
START_BY_PARAMETER = "sluice_start_by_us"
# Triton's own texts for a request its queue turned away (tritonserver 2.51's dynamic batcher). The encoder
# runtimes and the LLM engine answer with the same texts, with code UNAVAILABLE, so a client (the gateway's 503 with
# Retry-After) handles every refusal alike.
QUEUE_FULL_MESSAGE = "Exceeds maximum queue size"
QUEUE_TIMEOUT_MESSAGE = "Request timeout expired"
# The LLM engine's answer to every request still open when its model unloads (UNAVAILABLE: a client may retry).
UNLOADING_MESSAGE = "the model is unloading"
# The encoder runtimes' answer (UNAVAILABLE) to every request of a batch they stopped computing at the service's
# inference_timeout; followed by the timeout, e.g. "... inference_timeout (0.3 s)". The gateway answers it 504.
INFERENCE_TIMEOUT_MESSAGE = "the model stopped computing at its inference_timeout"
