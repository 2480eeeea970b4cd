"""A stand-in for the Hugging Face Hub on a loopback port, serving local directories as model repositories, so that
`sluice pull` can download with the real huggingface_hub client (HF_ENDPOINT pointed here) and no network.

It answers the three requests a snapshot download makes: the revision (``/api/models/<id>/revision/<rev>``), the
file tree (``/api/models/<id>/tree/<commit>``) and each file (``HEAD``/``GET /<id>/resolve/<commit>/<path>``, plain
HTTP, no Xet). Every file request is recorded in ``downloaded``.
"""

from __future__ import annotations

import hashlib
import json
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Self
from urllib.parse import unquote, urlsplit


class FakeHub:
    def __init__(self, repositories: dict[str, Path]) -> None:
        self.repositories = repositories
        self.downloaded: list[str] = []  # "<repo id>/<path>" of every GET of a file
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def commit(self, repo_id: str) -> str:
        return hashlib.sha1(f"commit of {repo_id}".encode(), usedforsecurity=False).hexdigest()

    def files(self, repo_id: str) -> dict[str, Path]:
        root = self.repositories[repo_id]
        return {str(p.relative_to(root)): p for p in sorted(root.rglob("*")) if p.is_file()}

    def __enter__(self) -> Self:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def _handler(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass

        def do_HEAD(self) -> None:
            self._answer(body=False)

        def do_GET(self) -> None:
            self._answer(body=True)

        def _answer(self, *, body: bool) -> None:
            path = unquote(urlsplit(self.path).path)
            for repo_id in hub.repositories:
                commit = hub.commit(repo_id)
                if path.startswith(f"/api/models/{repo_id}/revision/"):
                    siblings = [{"rfilename": name} for name in hub.files(repo_id)]
                    return self._json({"id": repo_id, "sha": commit, "siblings": siblings, "private": False})
                if path.startswith(f"/api/models/{repo_id}/tree/"):
                    return self._json([
                        {"type": "file", "path": name, "size": file.stat().st_size, "oid": _git_oid(file)}
                        for name, file in hub.files(repo_id).items()
                    ])
                prefix = f"/{repo_id}/resolve/{commit}/"
                if path.startswith(prefix) and path[len(prefix):] in hub.files(repo_id):
                    name = path[len(prefix):]
                    return self._file(repo_id, commit, name, hub.files(repo_id)[name], body=body)
            self.send_response(HTTPStatus.NOT_FOUND)
            self.send_header("X-Error-Code", "RepoNotFound")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def _json(self, data: Any) -> None:
            payload = json.dumps(data).encode()
            self.send_response(HTTPStatus.OK)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def _file(self, repo_id: str, commit: str, name: str, file: Path, *, body: bool) -> None:
            data = file.read_bytes()
            self.send_response(HTTPStatus.OK)
            self.send_header("X-Repo-Commit", commit)
            self.send_header("ETag", f'"{_git_oid(file)}"')
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if body:
                hub.downloaded.append(f"{repo_id}/{name}")
                self.wfile.write(data)

    return Handler


def _git_oid(file: Path) -> str:
    data = file.read_bytes()
    return hashlib.sha1(b"blob %d\0" % len(data) + data, usedforsecurity=False).hexdigest()
