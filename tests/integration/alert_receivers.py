"""Local HTTP receivers for alert deliveries (aiohttp, loopback, in a background thread).

Each endpoint checks what a real service would check and records only the requests it accepted:

- ``/webhook/<name>``: HMAC signature (recomputed here with hmac, independently of connectors/) and the
  replay window; 401 otherwise.
- ``/flaky/<name>``: a signed webhook that answers 503 with ``Retry-After: <s>`` until ``recover_at``.
- ``/broken/<name>``: always 500. ``/reject``: always 400.
- ``/slack``: incoming-webhook shape (``text`` + Block Kit blocks); answers ``ok`` like Slack.
- ``/pagerduty``: Events API v2 shape, routing key, dedup key; answers 202 like PagerDuty.
- ``/am-hook``: Alertmanager's webhook notifications.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

PD_SEVERITIES = {"critical", "error", "warning", "info"}


@dataclass
class Received:
    endpoint: str
    name: str
    headers: dict[str, str]
    body: bytes
    doc: Any
    at: float


@dataclass
class ReceiverServer:
    secret: bytes
    routing_key: str
    flaky_retry_after_s: int = 1
    recover_at: dict[str, float] = field(default_factory=dict)  # flaky name -> time.monotonic() it recovers
    received: list[Received] = field(default_factory=list)
    refused: list[tuple[str, int]] = field(default_factory=list)  # (endpoint/name, status) not accepted
    port: int = 0
    _loop: asyncio.AbstractEventLoop | None = None
    _thread: threading.Thread | None = None
    _runner: web.AppRunner | None = None

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def of(self, endpoint: str, name: str = "") -> list[Received]:
        return [r for r in self.received if r.endpoint == endpoint and (not name or r.name == name)]

    # -- handlers ----------------------------------------------------------------------------------

    def _verify(self, request: web.Request, body: bytes) -> bool:
        ts = request.headers.get("X-Iotad-Timestamp", "")
        sig = request.headers.get("X-Iotad-Signature", "")
        if not ts.isdigit() or abs(time.time() - int(ts)) > 300:
            return False
        expected = "sha256=" + hmac.new(self.secret, ts.encode() + b"." + body, hashlib.sha256).hexdigest()
        return hmac.compare_digest(expected, sig)

    def _accept(self, endpoint: str, name: str, request: web.Request, body: bytes) -> None:
        self.received.append(Received(endpoint, name, dict(request.headers), body, json.loads(body), time.monotonic()))

    def _refuse(self, endpoint: str, status: int, **kw: Any) -> web.Response:
        self.refused.append((endpoint, status))
        return web.Response(status=status, **kw)

    async def webhook(self, request: web.Request) -> web.Response:
        body = await request.read()
        name = request.match_info["name"]
        if not self._verify(request, body):
            return self._refuse(f"webhook/{name}", 401, text="bad signature")
        self._accept("webhook", name, request, body)
        return web.Response(status=204)

    async def flaky(self, request: web.Request) -> web.Response:
        body = await request.read()
        name = request.match_info["name"]
        if time.monotonic() < self.recover_at.get(name, 0.0):
            headers = {"Retry-After": str(self.flaky_retry_after_s)}
            return self._refuse(f"flaky/{name}", 503, text="down for maintenance", headers=headers)
        if not self._verify(request, body):
            return self._refuse(f"flaky/{name}", 401, text="bad signature")
        self._accept("flaky", name, request, body)
        return web.Response(status=200, text="ok")

    async def broken(self, request: web.Request) -> web.Response:
        await request.read()
        return self._refuse(f"broken/{request.match_info['name']}", 500, text="internal error")

    async def reject(self, request: web.Request) -> web.Response:
        await request.read()
        return self._refuse("reject", 400, text="invalid payload")

    async def slack(self, request: web.Request) -> web.Response:
        body = await request.read()
        doc = json.loads(body)
        ok = (
            request.content_type == "application/json"
            and isinstance(doc.get("text"), str)
            and doc["text"]
            and all(b.get("type") in {"section", "context", "header", "divider", "actions"} for b in doc["blocks"])
        )
        if not ok:
            return self._refuse("slack", 400, text="invalid_payload")
        self._accept("slack", "", request, body)
        return web.Response(text="ok")

    async def pagerduty(self, request: web.Request) -> web.Response:
        body = await request.read()
        doc = json.loads(body)
        errors = []
        if doc.get("routing_key") != self.routing_key:
            errors.append("routing_key")
        if doc.get("event_action") not in {"trigger", "resolve"}:
            errors.append("event_action")
        if not isinstance(doc.get("dedup_key"), str) or not 0 < len(doc["dedup_key"]) <= 255:
            errors.append("dedup_key")
        if doc.get("event_action") == "trigger":
            p = doc.get("payload") or {}
            if not (isinstance(p.get("summary"), str) and 0 < len(p["summary"]) <= 1024):
                errors.append("payload.summary")
            if not p.get("source"):
                errors.append("payload.source")
            if p.get("severity") not in PD_SEVERITIES:
                errors.append("payload.severity")
        if errors:
            return self._refuse("pagerduty", 400, text=json.dumps({"status": "invalid event", "errors": errors}))
        self._accept("pagerduty", "", request, body)
        resp = {"status": "success", "message": "Event processed", "dedup_key": doc["dedup_key"]}
        return web.json_response(resp, status=202)

    async def am_hook(self, request: web.Request) -> web.Response:
        body = await request.read()
        self._accept("am-hook", "", request, body)
        return web.Response(text="ok")

    # -- lifecycle ---------------------------------------------------------------------------------

    def start(self) -> ReceiverServer:
        ready = threading.Event()

        async def main() -> None:
            app = web.Application()
            app.router.add_post("/webhook/{name}", self.webhook)
            app.router.add_post("/flaky/{name}", self.flaky)
            app.router.add_post("/broken/{name}", self.broken)
            app.router.add_post("/reject", self.reject)
            app.router.add_post("/slack", self.slack)
            app.router.add_post("/pagerduty", self.pagerduty)
            app.router.add_post("/am-hook", self.am_hook)
            self._runner = web.AppRunner(app, access_log=None)
            await self._runner.setup()
            site = web.TCPSite(self._runner, "127.0.0.1", 0)
            await site.start()
            self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
            ready.set()

        def run() -> None:
            loop = self._loop = asyncio.new_event_loop()
            loop.run_until_complete(main())
            loop.run_forever()
            loop.run_until_complete(self._runner.cleanup() if self._runner else asyncio.sleep(0))
            loop.close()

        self._thread = threading.Thread(target=run, name="alert-receivers", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("alert receivers did not start")
        return self

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._loop = None
