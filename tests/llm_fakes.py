"""Test servers on 127.0.0.1 for the LLM provider tests (helpers, not tests).

- :class:`FaultProxy`: an OpenAI-compatible HTTP endpoint that forwards ``/v1/chat/completions``
  to a real upstream server (llama-cpp-python) -- or, with ``upstream=None``, answers itself with a
  deterministic echo -- and injects faults: 429 with Retry-After, 500, hangs past the client's
  timeout, truncated bodies, garbage bodies. It counts, per item tag, what it received, what it
  forwarded and which texts it delivered intact.
- :class:`GeminiFake`: speaks the Gemini REST wire format
  (``POST /v1beta/models/{model}:generateContent``) with scripted answers.

Items are identified by a ``[item N]`` tag in the first user message.
"""

from __future__ import annotations

import json
import random
import re
import socket
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

TAG = re.compile(r"\[item (\d+)\]")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def item_tag(body: dict[str, Any]) -> str:
    for m in body.get("messages") or body.get("contents") or []:
        text = m.get("content") if "content" in m else "".join(p.get("text", "") for p in m.get("parts", []))
        if isinstance(text, str):
            hit = TAG.search(text)
            if hit:
                return hit.group(1)
    return "?"


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 256  # the default listen backlog (5) resets connections under a 16-way load


def _json_bytes(obj: Any) -> bytes:
    return json.dumps(obj).encode()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    owner: Any = None

    def log_message(self, *args) -> None:  # quiet
        pass

    def _read_body(self) -> bytes:
        n = int(self.headers.get("content-length") or 0)
        return self.rfile.read(n) if n else b""

    def send_json(self, status: int, obj: Any, headers: dict[str, str] | None = None) -> None:
        data = _json_bytes(obj)
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        self.owner.handle_get(self)

    def do_POST(self) -> None:
        self.owner.handle_post(self, self._read_body())


class _Base:
    def __init__(self) -> None:
        handler = type("H", (_Handler,), {"owner": self})
        self.port = free_port()
        self.server = _Server(("127.0.0.1", self.port), handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def handle_get(self, h: _Handler) -> None:
        h.send_json(404, {"error": "not found"})


def echo_completion(body: dict[str, Any], text: str) -> dict[str, Any]:
    return {"id": "chatcmpl-fake", "object": "chat.completion", "created": 0, "model": body.get("model", "m"),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}}


FAULTS = ("429", "500", "hang", "truncate", "garbage", "401", "echo400")


class FaultProxy(_Base):
    """OpenAI-compatible endpoint with injected faults (see module docstring).

    ``rates``: probability of each fault per request. ``always``: tag -> fault applied to every
    request of that item (``"400"`` is a non-retryable client error). ``plan``: tag -> faults for
    that item's first requests, in order (``"ok"`` passes). ``responder(body, tag)`` replaces the
    echo when there is no upstream; ``delay_s`` slows the echo. 429, 500, 400, hang and garbage
    (a broken intermediary's page) never reach the upstream; a truncated body was forwarded.
    """

    def __init__(self, upstream: str | None = None, *, rates: dict[str, float] | None = None,
                 always: dict[str, str] | None = None, plan: dict[str, list[str]] | None = None,
                 seed: int = 0, hang_s: float = 10.0, retry_after: str = "1",
                 responder: Callable[[dict, str], str] | None = None, delay_s: float = 0.0):
        super().__init__()
        self.upstream = upstream.rstrip("/") if upstream else None
        self.rates = rates or {}
        self.always = always or {}
        self.plan = plan or {}
        self.delay_s = delay_s
        self.rng = random.Random(seed)
        self.hang_s = hang_s
        self.retry_after = retry_after
        self.responder = responder or (lambda body, tag: f"echo {tag}")
        self.received: Counter[str] = Counter()
        self.forwarded: Counter[str] = Counter()
        self.delivered: dict[str, list[str]] = defaultdict(list)  # tag -> texts sent intact
        self.faults: Counter[str] = Counter()
        self.times: dict[str, list[tuple[float, str]]] = defaultdict(list)  # tag -> (t, outcome)
        self.auth: list[str] = []
        self.bodies: dict[str, list[dict]] = defaultdict(list)  # tag -> request bodies
        self._http = None

    def __enter__(self):
        import httpx

        self._http = httpx.Client(timeout=120.0)
        return super().__enter__()

    def __exit__(self, *exc) -> None:
        super().__exit__(*exc)
        if self._http is not None:
            self._http.close()

    def _pick(self, tag: str, n: int) -> str:  # called under self.lock
        if tag in self.always:
            return self.always[tag]
        if n <= len(self.plan.get(tag, ())):
            return self.plan[tag][n - 1]
        r = self.rng.random()
        acc = 0.0
        for kind in FAULTS:
            acc += self.rates.get(kind, 0.0)
            if r < acc:
                return kind
        return "ok"

    def handle_get(self, h: _Handler) -> None:
        if self.upstream and h.path.startswith("/v1/models"):
            r = self._http.get(self.upstream + h.path)
            h.send_json(r.status_code, r.json())
        else:
            h.send_json(200, {"object": "list", "data": [{"id": "fake", "object": "model"}]})

    def _upstream(self, raw: bytes, body: dict) -> tuple[int, bytes]:
        if self.upstream is None:
            if self.delay_s:
                time.sleep(self.delay_s)
            text = self.responder(body, item_tag(body))
            return 200, _json_bytes(echo_completion(body, text))
        r = self._http.post(self.upstream + "/v1/chat/completions", content=raw,
                            headers={"content-type": "application/json"})
        return r.status_code, r.content

    def handle_post(self, h: _Handler, raw: bytes) -> None:
        body = json.loads(raw or b"{}")
        tag = item_tag(body)
        with self.lock:
            self.received[tag] += 1
            fault = self._pick(tag, self.received[tag])
            self.faults[fault] += 1
            self.times[tag].append((time.monotonic(), fault))
            self.auth.append(h.headers.get("authorization", ""))
            self.bodies[tag].append(body)
        if fault == "429":
            h.send_json(429, {"error": {"message": "rate limited", "type": "rate_limit", "code": 429}},
                        {"retry-after": self.retry_after})
            return
        if fault == "500":
            h.send_json(500, {"error": {"message": "boom", "type": "server_error", "code": 500}})
            return
        if fault == "400":
            h.send_json(400, {"error": {"message": "bad request", "type": "invalid_request_error"}})
            return
        if fault in ("401", "echo400"):  # a careless server that echoes the credentials it got
            auth = h.headers.get("authorization", "")
            status = 401 if fault == "401" else 400
            h.send_json(status, {"error": {"message": f"rejected request with Authorization: {auth}",
                                           "type": "invalid_request_error", "headers": {"authorization": auth}}},
                        {"x-echo-authorization": auth})
            return
        if fault == "hang":
            time.sleep(self.hang_s)
            h.close_connection = True
            return
        if fault in ("garbage", "html"):
            data = (b"<html>502 Bad Gateway ... \x00\xff not json" if fault == "garbage"
                    else b"<html><body>upstream says hello</body></html>")
            h.send_response(200)
            h.send_header("content-type", "application/json")
            h.send_header("content-length", str(len(data)))
            h.end_headers()
            h.wfile.write(data)
            return
        status, data = self._upstream(raw, body)
        with self.lock:
            self.forwarded[tag] += 1
        if fault == "truncate":
            h.send_response(status)
            h.send_header("content-type", "application/json")
            h.send_header("content-length", str(len(data)))
            h.end_headers()
            h.wfile.write(data[: len(data) // 2])
            h.wfile.flush()
            h.close_connection = True
            return
        h.send_response(status)
        h.send_header("content-type", "application/json")
        h.send_header("content-length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)
        if fault == "ok" and status == 200:
            try:
                text = json.loads(data)["choices"][0]["message"]["content"]
            except Exception:
                text = None
            with self.lock:
                self.delivered[tag].append(text)

    @property
    def total_received(self) -> int:
        return sum(self.received.values())


class GeminiFake(_Base):
    """``POST /v1beta/models/{model}:generateContent`` with scripted replies.

    ``script(model, body, n) -> (status, json, headers)`` where ``n`` counts this item's requests
    (1-based). The default answers ``{"text": "gemini says <tag>"}``-style text.
    """

    PATH = re.compile(r"^/(v1beta|v1)/models/([^/:]+):generateContent$")

    def __init__(self, script: Callable[[str, dict, int], tuple[int, dict, dict]] | None = None):
        super().__init__()
        self.script = script or (lambda model, body, n: (200, self.answer(f"gemini says {item_tag(body)}"), {}))
        self.requests: list[dict[str, Any]] = []
        self.per_tag: Counter[str] = Counter()

    @staticmethod
    def answer(text: str, prompt_tokens: int = 11, out_tokens: int = 5) -> dict[str, Any]:
        return {"candidates": [{"content": {"role": "model", "parts": [{"text": text}]},
                                "finishReason": "STOP", "index": 0}],
                "usageMetadata": {"promptTokenCount": prompt_tokens, "candidatesTokenCount": out_tokens,
                                  "totalTokenCount": prompt_tokens + out_tokens},
                "modelVersion": "fake-gemini-001"}

    @staticmethod
    def error(code: int, status: str, message: str) -> dict[str, Any]:
        return {"error": {"code": code, "message": message, "status": status}}

    def handle_post(self, h: _Handler, raw: bytes) -> None:
        m = self.PATH.match(h.path.split("?")[0])
        if not m:
            h.send_json(404, self.error(404, "NOT_FOUND", f"no route {h.path}"))
            return
        body = json.loads(raw or b"{}")
        tag = item_tag(body)
        with self.lock:
            self.per_tag[tag] += 1
            n = self.per_tag[tag]
            self.requests.append({"path": h.path, "model": m.group(2), "body": body,
                                  "api_key": h.headers.get("x-goog-api-key")})
        status, obj, headers = self.script(m.group(2), body, n)
        h.send_json(status, obj, headers)
