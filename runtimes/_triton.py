"""What every Sluice model.py needs from Triton's Python backend: its settings, its inputs, error responses.

Imports ``triton_python_backend_utils``, which exists only inside Triton's Python stub.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import numpy.typing as npt
import triton_python_backend_utils as pb_utils

from runtimes.parameters import RuntimeParameters
from runtimes.signatures import TOKENS, TRUNCATED

if TYPE_CHECKING:  # onnxruntime stays out of the LLM model's process
    from runtimes.encoders import Encoded, OnnxEncoder

Row = TypeVar("Row")


def model_parameters(args: Mapping[str, str], *, llm: bool = False) -> RuntimeParameters:
    """config.pbtxt ``parameters``, parsed strictly (runtimes/parameters.py)."""
    return RuntimeParameters.from_model_config(json.loads(args["model_config"]), llm=llm)


def version_dir(args: Mapping[str, str]) -> Path:
    """``<repository>/<model>/<version>``: where model.py, runtimes/ and artifacts/ live."""
    return Path(args["model_repository"]) / args["model_version"]


def gpu_device_id(args: Mapping[str, str]) -> int | None:
    """The GPU this instance was placed on by instance_group, or None on CPU."""
    return int(args["model_instance_device_id"]) if args.get("model_instance_kind") == "GPU" else None


def _text(value: Any, name: str) -> str:
    try:
        return bytes(value).decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"input {name!r} is not valid UTF-8") from None


def request_strings(request: Any, name: str) -> list[str]:
    """The rows of a BYTES input as text; ValueError naming the input when missing or not UTF-8."""
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        raise ValueError(f"input {name!r} is required")
    return [_text(value, name) for value in tensor.as_numpy().reshape(-1)]


def request_value(request: Any, name: str) -> Any:
    """The single element of an optional input ([1, 1]: batch row + dim) as a Python value, or None when absent;
    ValueError naming the input when it holds several values or text that is not UTF-8."""
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        return None
    array = tensor.as_numpy()
    if array.size != 1:
        raise ValueError(f"input {name!r} must hold one value per request, got shape {list(array.shape)}")
    value = array.reshape(-1)[0]
    if isinstance(value, bytes | np.bytes_):
        return _text(value, name)
    return value.item() if isinstance(value, np.generic) else value


def error_response(message: str, *, internal: bool = False) -> Any:
    """A response carrying only an error. The default, INVALID_ARG, is the client's fault (Triton's HTTP API
    answers 400); ``internal`` is the server's (500)."""
    code = pb_utils.TritonError.INTERNAL if internal else pb_utils.TritonError.INVALID_ARG
    return pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(message, code))


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
                    pb_utils.Tensor(TOKENS, column(encoded.tokens[start:end], np.int32)),
                    pb_utils.Tensor(TRUNCATED, column(encoded.truncated[start:end], np.bool_)),
                ]
            )
        )
        start = end
    return responses


def load_encoder(args: Mapping[str, str]) -> OnnxEncoder:
    """The ONNX encoder of an embedding or reranker instance, placed and threaded as its config says."""
    from runtimes.encoders import OnnxEncoder, open_session

    parameters = model_parameters(args)
    artifacts = version_dir(args) / parameters.artifacts_dir
    session = open_session(artifacts / "model.onnx", parameters.threads(os.cpu_count()), gpu_device_id(args))
    return OnnxEncoder(artifacts, parameters.max_length, session)
