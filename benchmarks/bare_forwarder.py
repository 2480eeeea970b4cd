"""The least any Python HTTP-to-Triton hop costs: a reference for the gateway in `make bench`.

One ASGI callable, served as `sluice gateway` is (``sluice.serve.serve_asgi``), that reads an OpenAI-shaped
embeddings request and makes the same gRPC call as the gateway (``gateway.triton.Triton``), one call per request,
and nothing else: no validation, rate limit, cache, deadline, auth, metrics, disconnect watch, or merging of
concurrent requests into one Triton call (gateway/coalescing.py). The benchmark measures it beside the
gateway, so that the gateway's cost splits into what any hop costs on this machine (forwarder / Triton) and what the
gateway's features add (gateway / forwarder).

    python -m benchmarks.bare_forwarder --triton-grpc 127.0.0.1:8001 --port 8090
"""

from __future__ import annotations

import argparse
from typing import Any

import orjson

from gateway.errors import GatewayError
from gateway.triton import Triton, text_column
from sluice.serve import serve_asgi

OUTPUTS = ("embedding", "tokens", "truncated")
TIMEOUT_S = 5.0


def forwarder(triton_grpc: str) -> Any:
    triton: Triton | None = None

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        nonlocal triton
        if scope["type"] == "lifespan":
            await receive()  # lifespan.startup
            triton = Triton(triton_grpc)
            await send({"type": "lifespan.startup.complete"})
            await receive()  # lifespan.shutdown
            await triton.close()
            await send({"type": "lifespan.shutdown.complete"})
            return
        assert triton is not None
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        if scope["path"] == "/ready":
            status, payload = 200, b"{}"
        else:
            request = orjson.loads(body)
            texts = request["input"] if isinstance(request["input"], list) else [request["input"]]
            try:
                result = await triton.infer(request["model"], {"text": text_column(texts)}, OUTPUTS, TIMEOUT_S)
                status = 200
                payload = orjson.dumps(
                    {"object": "list", "model": request["model"],
                     "data": [{"object": "embedding", "index": i, "embedding": row}
                              for i, row in enumerate(result["embedding"])]},
                    option=orjson.OPT_SERIALIZE_NUMPY,
                )
            except GatewayError as error:
                status, payload = error.status, orjson.dumps(error.body())
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": payload})

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--triton-grpc", required=True)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    serve_asgi(forwarder(args.triton_grpc), "127.0.0.1", args.port)


if __name__ == "__main__":
    main()
