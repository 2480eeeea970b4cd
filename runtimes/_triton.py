"""What every Sluice model.py needs from Triton's Python backend: its settings, its inputs, error responses.

Imports ``triton_python_backend_utils``, which exists only inside Triton's Python stub.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import numpy.typing as npt
import triton_python_backend_utils as pb_utils

if TYPE_CHECKING:  # onnxruntime stays out of the LLM model's process
    from runtimes.encoders import Encoded, OnnxEncoder

Row = TypeVar("Row")


def model_parameters(args: dict[str, str]) -> dict[str, str]:
    """config.pbtxt ``parameters`` (string values, written by the compiler)."""
    config = json.loads(args["model_config"])
    return {name: entry.get("string_value", "") for name, entry in config.get("parameters", {}).items()}


def version_dir(args: dict[str, str]) -> Path:
    """``<repository>/<model>/<version>``: where model.py, runtimes/ and artifacts/ live."""
    return Path(args["model_repository"]) / args["model_version"]


def gpu_device_id(args: dict[str, str]) -> int | None:
    """The GPU this instance was placed on by instance_group, or None on CPU."""
    return int(args["model_instance_device_id"]) if args.get("model_instance_kind") == "GPU" else None


def request_strings(request: Any, name: str) -> list[str]:
    """The rows of a BYTES input as text; ValueError naming the input when missing or not UTF-8."""
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        raise ValueError(f"input {name!r} is required")
    try:
        return [bytes(value).decode("utf-8") for value in tensor.as_numpy().reshape(-1)]
    except UnicodeDecodeError:
        raise ValueError(f"input {name!r} is not valid UTF-8") from None


def error_response(message: str) -> Any:
    return pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(message))


def column(values: npt.ArrayLike, dtype: Any) -> npt.NDArray[Any]:
    """Rows as a [rows, 1] array, the shape of a ``dims: [1]`` output with a batch dimension."""
    return np.asarray(values, dtype=dtype).reshape(-1, 1)


def encoder_responses(
    requests: list[Any],
    parse: Callable[[Any], list[Row]],
    run: Callable[[list[Row]], Encoded],
    value_name: str,
) -> list[Any]:
    """Run every row of every request through one ``run`` call and answer each request with its own rows.

    A request whose inputs do not parse gets an error response naming the input; the others are served.
    """
    parsed: list[list[Row] | ValueError] = []
    for request in requests:
        try:
            parsed.append(parse(request))
        except ValueError as error:
            parsed.append(error)
    encoded = run([row for rows in parsed if isinstance(rows, list) for row in rows])
    responses, start = [], 0
    for rows in parsed:
        if isinstance(rows, ValueError):
            responses.append(error_response(str(rows)))
            continue
        end = start + len(rows)
        values = encoded.values[start:end]
        values = values if values.ndim > 1 else column(values, np.float32)  # scores: [rows] -> [rows, 1]
        responses.append(
            pb_utils.InferenceResponse(
                output_tensors=[
                    pb_utils.Tensor(value_name, np.ascontiguousarray(values)),
                    pb_utils.Tensor("tokens", column(encoded.tokens[start:end], np.int32)),
                    pb_utils.Tensor("truncated", column(encoded.truncated[start:end], np.bool_)),
                ]
            )
        )
        start = end
    return responses


def load_encoder(args: dict[str, str]) -> OnnxEncoder:
    """The ONNX encoder of an embedding or reranker instance, placed and threaded as its config says."""
    from runtimes.encoders import OnnxEncoder, open_session, session_threads

    parameters = model_parameters(args)
    artifacts = version_dir(args) / parameters["artifacts_dir"]
    threads = session_threads(int(parameters["intra_op_threads"]), int(parameters["worker_count"]))
    session = open_session(artifacts / "model.onnx", threads, gpu_device_id(args))
    return OnnxEncoder(artifacts, int(parameters["max_length"]), session)
