"""A Hugging Face hub stand-in on 127.0.0.1 for download tests: the part of the protocol `hf_hub_download` uses.

`hf_hub_download(repo, filename, repo_type="dataset", revision=REV, endpoint=URL)` sends
    HEAD URL/datasets/{repo}/resolve/{REV}/{filename}   -> needs X-Repo-Commit, ETag (an LFS file's is the content's
                                                           sha256) and Content-Length (the size it will insist on)
    GET  the same URL [Range: bytes=N-]                 -> 200, or 206 with Content-Range when resuming
(huggingface_hub 2.4 file_download.py: get_hf_file_metadata, _get_metadata_or_catch_error, http_get). A HEAD
answered with 5xx is retried with backoff (seconds); a GET answered with 500 fails at once; a connection that
drops mid-body is resumed with a Range request after one second.

Faults, per file; a name ending in "_once" applies to the next GET only, the others to every GET:
    "drop_once"  send the headers of the whole file, half the body, then close the connection
    "short"      a body of half the size, with a matching Content-Length (the HEAD announced the full size)
    "corrupt"    the full length with its last byte changed (the ETag still names the right content)
    "error"      HTTP 500 on GET
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

COMMIT = "0123456789abcdef0123456789abcdef01234567"


class Hub:
    """Files of one dataset repository (path in the repo -> bytes), faults and a log of the requests."""

    def __init__(self, repo: str, files: dict[str, bytes]) -> None:
        self.repo, self.files = repo, dict(files)
        self.faults: dict[str, str] = {}
        self.log: list[tuple[str, str | None, str | None]] = []  # (method, filename, Range header) of file requests
        self.other: list[str] = []  # any other path asked for (answered 404), e.g. the library's own API calls
        self.url = ""

    def _file(self, path: str) -> str | None:
        prefix = f"/datasets/{self.repo}/resolve/"
        name = path[len(prefix):].split("/", 1)[-1] if path.startswith(prefix) else None  # after the revision
        if name not in self.files:
            self.other.append(path)
            return None
        return name

    def handler(self) -> type[BaseHTTPRequestHandler]:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # quiet
                pass

            def _headers(self, name: str, length: int) -> None:
                self.send_header("X-Repo-Commit", COMMIT)
                self.send_header("ETag", f'"{hashlib.sha256(hub.files[name]).hexdigest()}"')
                self.send_header("Content-Length", str(length))
                self.end_headers()

            def _not_found(self) -> None:
                self.send_response(404)
                self.send_header("X-Error-Code", "EntryNotFound")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def do_HEAD(self) -> None:
                name = hub._file(self.path)
                if name is None:
                    return self._not_found()
                hub.log.append(("HEAD", name, None))
                self.send_response(200)
                self._headers(name, len(hub.files[name]))

            def do_GET(self) -> None:
                name, rng = hub._file(self.path), self.headers.get("Range")
                if name is None:
                    return self._not_found()
                hub.log.append(("GET", name, rng))
                data, fault = hub.files[name], hub.faults.get(name)
                if fault and fault.endswith("_once"):
                    del hub.faults[name]
                if fault == "error":
                    self.send_response(500)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                start = int(rng.removeprefix("bytes=").split("-")[0]) if rng else 0
                body = data[start:]
                if fault == "corrupt":
                    body = body[:-1] + bytes([body[-1] ^ 0xFF])
                elif fault == "short":
                    body = body[: len(body) // 2]
                self.send_response(206 if start else 200)
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self._headers(name, len(body))
                if fault == "drop_once":
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body)

        return Handler


@contextmanager
def serve(hub: Hub) -> Iterator[Hub]:
    """Run `hub` on a free port of 127.0.0.1 in a thread; hub.url is its endpoint while the block runs."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), hub.handler())
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    hub.url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        yield hub
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
