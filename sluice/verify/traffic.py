"""The probes' traffic: request shapes per service type and ways to send them (one, a burst, an open loop at a
rate), each answer timed from the moment its request was written."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

import orjson

from benchmarks.http_client import LeanClient
from compiler.plan import ServicePlan

# Far more than any answer should take: a probe whose request is not answered in this long records status 0.
ANSWER_LIMIT_S = 30.0


@dataclass(frozen=True)
class Timed:
    status: int  # 0: no answer (connection broken, or nothing within ANSWER_LIMIT_S)
    retry_after: str | None
    sent: float  # time.monotonic() when written
    seconds: float
    body: bytes

    def json(self) -> dict[str, object]:
        value = orjson.loads(self.body)
        return value if isinstance(value, dict) else {}


class Shapes:
    """Requests for one service. Every request is distinct (a per-run nonce and a counter), so that a cache never
    answers one unless a probe repeats it on purpose."""

    def __init__(self, service: ServicePlan) -> None:
        self.service = service
        self.kind = service.model.type
        self.path = {"embedding": "/v1/embeddings", "reranker": "/v1/rerank", "llm": "/v1/completions"}[self.kind]
        self._nonce = secrets.token_hex(4)
        self._count = 0

    def _tag(self) -> str:
        self._count += 1
        return f"{self._nonce}-{self._count}"

    def light(self, text: str | None = None) -> dict[str, object]:
        """One item, quick to compute (one token generated, for the LLM)."""
        text = text or f"probe {self._tag()} the quick brown fox"
        if self.kind == "embedding":
            return {"model": self.service.name, "input": [text]}
        if self.kind == "reranker":
            return {"model": self.service.name, "query": "which animal is quick", "documents": [text]}
        return {"model": self.service.name, "prompt": text, "max_tokens": 1}

    def heavy(self) -> dict[str, object]:
        """The longest work one request of this service can ask for: batch_size items of max_length tokens, or for
        the LLM the longest generation its context window allows."""
        rows = self.service.runtime.batch_size
        long = "hello " * self.service.model.max_length
        if self.kind == "embedding":
            return {"model": self.service.name, "input": [f"{self._tag()} {long}" for _ in range(rows)]}
        if self.kind == "reranker":
            return {"model": self.service.name, "query": f"{self._tag()} {long}",
                    "documents": [f"{self._tag()} {long}" for _ in range(rows)]}
        return self.generation(self.service.model.max_length - 8)

    def generation(self, tokens: int) -> dict[str, object]:
        return {"model": self.service.name, "prompt": f"probe {self._tag()}", "max_tokens": tokens}


class Traffic:
    """Sends one service's requests to the gateway (keep-alive connections from a pool)."""

    def __init__(self, gateway: str, headers: dict[str, str], shapes: Shapes) -> None:
        parts = urlsplit(gateway)
        self._client = LeanClient(parts.hostname or "127.0.0.1", parts.port or 80, headers=headers)
        self.shapes = shapes
        self.answers: list[Timed] = []  # every answer any probe got: total_timeout reads them all

    async def close(self) -> None:
        await self._client.close()

    async def send(self, body: dict[str, object]) -> Timed:
        request = self._client.request(self.shapes.path, orjson.dumps(body))
        sent = time.monotonic()
        try:
            async with asyncio.timeout(ANSWER_LIMIT_S):
                answer = await self._client.send(request)
            timed = Timed(answer.status, answer.retry_after, sent, time.monotonic() - sent, answer.body)
        except (OSError, asyncio.IncompleteReadError, TimeoutError):
            timed = Timed(0, None, sent, time.monotonic() - sent, b"")
        self.answers.append(timed)
        return timed

    async def burst(self, bodies: list[dict[str, object]]) -> list[Timed]:
        """All at once."""
        return list(await asyncio.gather(*(self.send(body) for body in bodies)))

    async def open_loop(self, make: Callable[[], dict[str, object]], rate: float, seconds: float) -> list[Timed]:
        """``rate`` requests a second for ``seconds``, each sent on time whatever the answers before it."""
        start, tasks = time.monotonic(), []
        for index in range(int(rate * seconds)):
            delay = start + index / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(self.send(make())))
        return list(await asyncio.gather(*tasks))
