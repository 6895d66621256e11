"""Alert delivery: signed JSON webhooks, Slack, PagerDuty Events API v2, Prometheus Alertmanager.

Input is one alert record of the ``<prefix>.alerts`` outbox: its raw JSON bytes and the decoded mapping
(fields of ``pipeline.alerting.AlertEvent``: event_id, action trigger|resolve, kind device|storm, dedup_key,
device_id, group, severity, summary, score, threshold, top_sensors, model_version, opened_at, triggered_at,
resolved_at, links, ...). Each receiver renders it in its format and posts it; :meth:`Receiver.deliver`
retries with capped exponential backoff and full jitter, or after ``Retry-After`` when the server sends
one, within a retry budget (attempts and seconds), and returns a typed :class:`DeliveryResult`. It never
raises for a failed delivery: the caller dead-letters results that are not ``ok``.

Generic webhook signature (``X-Iotad-Signature``)::

    X-Iotad-Timestamp: <unix seconds when this attempt was signed>
    X-Iotad-Signature: sha256=<hex HMAC-SHA256(secret, "<timestamp>." + raw body)>

A receiver verifies it (see :func:`verify_signature`, which does exactly this): read the raw body bytes
before parsing them; recompute the HMAC over ``timestamp + "." + body`` with the shared secret; compare in
constant time (``hmac.compare_digest``); reject timestamps more than 5 minutes from its own clock (replay
window); then de-duplicate by ``event_id`` (delivery is at-least-once: a retried or replayed request
carries the same event_id and dedup_key, with a fresh timestamp and signature).

Failure classes: 2xx = delivered; no response, 408, 425, 429 and 5xx = retried; any other status = rejected
at once (a payload or credentials problem that retrying cannot fix). After a delivery fails past its
budget the receiver is considered down for ``circuit_open_s``: deliveries to it get one attempt each until
one succeeds, so one dead receiver cannot stall the others for a whole budget per alert.

Routing (:func:`load_router`): a YAML or JSON file with ``receivers`` and ``routes``; see ALERTING.md.
Secrets (the webhook HMAC key, the PagerDuty routing key, the Slack URL) come from ``<key>_env`` (an
environment variable) or ``<key>_file`` (a mounted secret file), and never appear in logs, reprs or
dead-letter details.
"""

from __future__ import annotations

import abc
import asyncio
import fnmatch
import hashlib
import hmac
import json
import logging
import random
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar

import aiohttp

from connectors.influx import parse_retry_after

log = logging.getLogger(__name__)

SEVERITIES = ("critical", "major", "warning", "info")  # most severe first
SIGNATURE_HEADER = "X-Iotad-Signature"
TIMESTAMP_HEADER = "X-Iotad-Timestamp"
EVENT_ID_HEADER = "X-Iotad-Event-Id"
DEDUP_KEY_HEADER = "X-Iotad-Dedup-Key"
SIGNATURE_TOLERANCE_S = 300
USER_AGENT = "iotad-alerter/1"
PAGERDUTY_URL = "https://events.pagerduty.com/v2/enqueue"
PAGERDUTY_SEVERITY = {"critical": "critical", "major": "error", "warning": "warning", "info": "info"}
RETRY_STATUSES = frozenset({408, 425, 429})
MAX_ERROR_BODY = 2048


def severity_rank(name: str) -> int:
    """Higher is more severe; unknown names rank lowest."""
    return len(SEVERITIES) - SEVERITIES.index(name) if name in SEVERITIES else 0


# -- signatures ------------------------------------------------------------------------------------------


def sign(secret: bytes, timestamp: int, body: bytes) -> str:
    """``sha256=<hex>`` of HMAC-SHA256(secret, ``<timestamp>.`` + body)."""
    mac = hmac.new(secret, str(timestamp).encode() + b"." + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


def verify_signature(
    secrets: bytes | Sequence[bytes],
    body: bytes,
    timestamp: str | None,
    signature: str | None,
    *,
    now: float | None = None,
    tolerance_s: float = SIGNATURE_TOLERANCE_S,
) -> bool:
    """True if ``signature`` (the X-Iotad-Signature header) signs ``body`` at ``timestamp`` with a secret.

    ``secrets`` may list several keys (the new and the old one while rotating). The timestamp must be an
    integer within ``tolerance_s`` of ``now`` (default: the local clock), which bounds replays.
    """
    if not timestamp or not signature:
        return False
    try:
        ts = int(timestamp)
    except ValueError:
        return False
    now = time.time() if now is None else now
    if abs(now - ts) > tolerance_s:
        return False
    keys = [secrets] if isinstance(secrets, bytes) else list(secrets)
    given = signature.strip()
    return any(hmac.compare_digest(sign(key, ts, body), given) for key in keys)


# -- payload formats -------------------------------------------------------------------------------------


def _iso(ms: int | float) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _links(alert: Mapping[str, Any]) -> list[dict[str, str]]:
    return [{"name": str(x.get("name", "")), "url": str(x.get("url", ""))} for x in alert.get("links") or []]


def _fmt(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def _slack_escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def slack_payload(alert: Mapping[str, Any]) -> dict[str, Any]:
    """A Slack incoming-webhook message (``text`` fallback + Block Kit blocks)."""
    resolved = alert["action"] == "resolve"
    status = "RESOLVED" if resolved else f"FIRING · {alert['severity']}"
    icon = ":white_check_mark:" if resolved else (":rotating_light:" if alert["kind"] == "storm" else ":warning:")
    summary = _slack_escape(str(alert["summary"]))
    text = f"{icon} [{status}] {summary}"
    fields = [f"*Severity*\n{alert['severity']}", f"*Group*\n{_slack_escape(str(alert['group']))}"]
    if alert.get("device_id"):
        fields.append(f"*Device*\n{_slack_escape(str(alert['device_id']))}")
    if alert.get("score") is not None:
        fields.append(f"*Score / threshold*\n{_fmt(alert['score'])} / {_fmt(alert.get('threshold'))}")
    if alert.get("top_sensors"):
        fields.append(f"*Top sensors*\n{_slack_escape(', '.join(alert['top_sensors']))}")
    if alert["kind"] == "storm":
        fields.append(f"*Devices alerting*\n{alert.get('device_count')} of {alert.get('fleet_size')}")
    if alert.get("model_version"):
        fields.append(f"*Model*\n{_slack_escape(str(alert['model_version']))}")
    blocks: list[dict[str, Any]] = [
        {"type": "section", "text": {"type": "mrkdwn", "text": text}},
        {"type": "section", "fields": [{"type": "mrkdwn", "text": f} for f in fields[:10]]},
    ]
    links = " · ".join(f"<{x['url']}|{_slack_escape(x['name'])}>" for x in _links(alert) if x["url"])
    context = f"dedup `{_slack_escape(str(alert['dedup_key']))}`" + (f" · {links}" if links else "")
    blocks.append({"type": "context", "elements": [{"type": "mrkdwn", "text": context}]})
    return {"text": text, "blocks": blocks}


def pagerduty_dedup_key(dedup_key: str) -> str:
    """PagerDuty allows 255 characters: longer keys are shortened to a stable hash."""
    if len(dedup_key) <= 255:
        return dedup_key
    return dedup_key[:190] + ":" + hashlib.sha256(dedup_key.encode()).hexdigest()


def pagerduty_payload(alert: Mapping[str, Any], routing_key: str) -> dict[str, Any]:
    """A PagerDuty Events API v2 event: trigger (full payload) or resolve, keyed by the dedup key."""
    body: dict[str, Any] = {
        "routing_key": routing_key,
        "event_action": "resolve" if alert["action"] == "resolve" else "trigger",
        "dedup_key": pagerduty_dedup_key(str(alert["dedup_key"])),
    }
    if body["event_action"] == "resolve":
        return body
    details = {
        k: alert.get(k)
        for k in (
            "event_id",
            "dedup_key",
            "kind",
            "scope",
            "score",
            "threshold",
            "ratio",
            "top_sensors",
            "sensors",
            "model_version",
            "steps_above",
            "device_count",
            "fleet_size",
            "devices",
        )
        if alert.get(k) not in (None, [], {})
    }
    details["opened_at"] = _iso(alert["opened_at"])
    payload: dict[str, Any] = {
        "summary": str(alert["summary"])[:1024],
        "source": alert.get("device_id") or f"iotad {alert['scope']}",
        "severity": PAGERDUTY_SEVERITY.get(str(alert["severity"]), "warning"),
        "timestamp": _iso(alert["triggered_at"]),
        "group": str(alert["group"]),
        "class": "alert_storm" if alert["kind"] == "storm" else "anomaly",
        "custom_details": details,
    }
    if alert.get("top_sensors"):
        payload["component"] = alert["top_sensors"][0]
    body["payload"] = payload
    body["client"] = "iotad"
    links = [x for x in _links(alert) if x["url"]]
    if links:
        body["client_url"] = links[0]["url"]
        body["links"] = [{"href": x["url"], "text": x["name"]} for x in links]
    return body


def alertmanager_payload(alert: Mapping[str, Any], *, now_s: float, firing_ttl_s: float) -> list[dict[str, Any]]:
    """A one-alert list for Alertmanager's ``POST /api/v2/alerts``.

    The labels (alertname, device, group, severity, scope, incident = dedup key) are identical for the
    trigger and the resolve of an incident, so Alertmanager sees one alert. A trigger sets ``endsAt`` to
    now + firing_ttl_s (Alertmanager would otherwise resolve it after its resolve_timeout); the resolve sets
    ``endsAt`` to the time the device went back to normal.
    """
    storm = alert["kind"] == "storm"
    labels = {
        "alertname": "IotadAlertStorm" if storm else "IotadDeviceAnomaly",
        "severity": str(alert["severity"]),
        "group": str(alert["group"]),
        "scope": str(alert["scope"]),
        "incident": str(alert["dedup_key"]),
    }
    if alert.get("device_id"):
        labels["device"] = str(alert["device_id"])
    annotations = {"summary": str(alert["summary"]), "dedup_key": str(alert["dedup_key"])}
    if alert.get("top_sensors"):
        annotations["top_sensors"] = ", ".join(alert["top_sensors"])
    for key in ("score", "threshold"):
        if alert.get(key) is not None:
            annotations[key] = _fmt(alert[key])
    if alert.get("model_version"):
        annotations["model_version"] = str(alert["model_version"])
    if storm:
        annotations["devices"] = ", ".join(alert.get("devices") or [])
        annotations["device_count"] = str(alert.get("device_count"))
    links = [x for x in _links(alert) if x["url"]]
    if links:
        annotations["dashboard"] = links[0]["url"]
    starts = int(alert["opened_at"])
    if alert["action"] == "resolve":
        ends = max(int(alert.get("resolved_at") or starts), starts + 1)
    else:
        ends = max(int((now_s + firing_ttl_s) * 1000), starts + 1)
    item: dict[str, Any] = {
        "labels": labels,
        "annotations": annotations,
        "startsAt": _iso(starts),
        "endsAt": _iso(ends),
    }
    if links:
        item["generatorURL"] = links[0]["url"]
    return [item]


# -- retries, rate limits, results ----------------------------------------------------------------------


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 8
    base_delay_s: float = 0.5
    max_delay_s: float = 30.0
    max_retry_after_s: float = 300.0
    budget_s: float = 120.0
    circuit_open_s: float = 60.0

    def backoff_s(self, attempt: int, retry_after: float | None = None) -> float:
        """Delay before retry number ``attempt`` (1-based): Retry-After (capped) if given, else full jitter."""
        if retry_after is not None:
            return min(retry_after, self.max_retry_after_s)
        ceiling = min(self.max_delay_s, self.base_delay_s * 2.0 ** min(attempt - 1, 30))
        return random.uniform(0.0, ceiling)


class TokenBucket:
    """Async token bucket: ``rate`` deliveries/s with bursts of ``burst``; ``rate <= 0`` = unlimited."""

    def __init__(self, rate: float, burst: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self.burst = max(1.0, burst)
        self.tokens = self.burst
        self.clock = clock
        self.updated = clock()
        self._lock = asyncio.Lock()

    def _refill(self) -> None:
        now = self.clock()
        self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
        self.updated = now

    async def acquire(self) -> None:
        if self.rate <= 0:
            return
        async with self._lock:
            self._refill()
            while self.tokens < 1.0:
                await asyncio.sleep((1.0 - self.tokens) / self.rate)
                self._refill()
            self.tokens -= 1.0


@dataclass(frozen=True)
class DeliveryResult:
    receiver: str
    ok: bool
    attempts: int
    status: int | None
    reason: str  # ok | rejected | retries_exhausted | receiver_down
    detail: str = ""
    seconds: float = 0.0


@dataclass(frozen=True)
class HttpRequest:
    url: str
    body: bytes
    headers: dict[str, str]


def _redact_url(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    host = rest.split("/", 1)[0].rsplit("@", 1)[-1]
    return f"{scheme}{sep}{host}/…" if sep else "…"


class Receiver(abc.ABC):
    """One configured destination. Subclasses render the alert; the retry loop is shared."""

    kind: ClassVar[str] = ""
    default_rate: ClassVar[float] = 0.0  # deliveries/s; 0 = unlimited

    def __init__(
        self,
        name: str,
        url: str,
        *,
        retry: RetryPolicy | None = None,
        timeout_s: float = 10.0,
        rate_per_s: float | None = None,
        burst: float = 10.0,
        headers: Mapping[str, str] | None = None,
        secrets: Iterable[str] = (),
    ) -> None:
        self.name = name
        self.url = url
        self.retry = retry or RetryPolicy()
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)
        self.bucket = TokenBucket(self.default_rate if rate_per_s is None else rate_per_s, burst)
        self.extra_headers = dict(headers or {})
        self._secrets = [s for s in secrets if s]
        self.down_until = 0.0

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, {_redact_url(self.url)})"

    @abc.abstractmethod
    def render(self, alert: Mapping[str, Any], raw: bytes, now_s: float) -> HttpRequest:
        """The request for one attempt (signed at ``now_s`` where the format signs)."""

    def redact(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text

    def _json(self, url: str, doc: Any) -> HttpRequest:
        body = json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode()
        headers = {"Content-Type": "application/json", "User-Agent": USER_AGENT, **self.extra_headers}
        return HttpRequest(url, body, headers)

    async def deliver(
        self,
        session: aiohttp.ClientSession,
        alert: Mapping[str, Any],
        raw: bytes,
        *,
        on_retry: Callable[[DeliveryResult], None] | None = None,
    ) -> DeliveryResult:
        """Deliver with retries; never raises for a failed delivery (see the module docstring)."""
        policy = self.retry
        started = time.monotonic()
        down = started < self.down_until
        max_attempts = 1 if down else policy.max_attempts
        attempt = 0
        while True:
            attempt += 1
            await self.bucket.acquire()
            req = self.render(alert, raw, time.time())
            status: int | None = None
            retry_after: float | None = None
            try:
                async with session.post(req.url, data=req.body, headers=req.headers, timeout=self.timeout) as resp:
                    status = resp.status
                    text = (await resp.content.read(MAX_ERROR_BODY)).decode(errors="replace")
                    retry_after = parse_retry_after(resp.headers.get("Retry-After"))
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                text = f"{type(exc).__name__}: {exc}"
            elapsed = time.monotonic() - started
            if status is not None and 200 <= status < 300:
                self.down_until = 0.0
                if attempt > 1:
                    log.info("alert %s delivered to %s after %d attempts", alert.get("event_id"), self.name, attempt)
                return DeliveryResult(self.name, True, attempt, status, "ok", "", elapsed)
            detail = self.redact(f"HTTP {status}: {text.strip()[:500]}" if status is not None else text[:500])
            if status is not None and status not in RETRY_STATUSES and status < 500:
                log.error("%s rejected alert %s: %s", self.name, alert.get("event_id"), detail)
                return DeliveryResult(self.name, False, attempt, status, "rejected", detail, elapsed)
            delay = policy.backoff_s(attempt, retry_after)
            if attempt >= max_attempts or elapsed + delay > policy.budget_s:
                self.down_until = time.monotonic() + policy.circuit_open_s
                reason = "receiver_down" if down else "retries_exhausted"
                log.error("delivery of %s to %s failed (%s): %s", alert.get("event_id"), self.name, reason, detail)
                return DeliveryResult(self.name, False, attempt, status, reason, detail, elapsed)
            result = DeliveryResult(self.name, False, attempt, status, "retry", detail, elapsed)
            level = logging.WARNING if attempt == 1 else logging.DEBUG
            log.log(level, "delivery to %s attempt %d failed, retry in %.2f s: %s", self.name, attempt, delay, detail)
            if on_retry is not None:
                on_retry(result)
            await asyncio.sleep(delay)


class WebhookReceiver(Receiver):
    """The outbox record as is (raw JSON), HMAC-signed when a secret is configured."""

    kind = "webhook"

    def __init__(self, name: str, url: str, *, secret: bytes | None = None, **kw: Any) -> None:
        super().__init__(name, url, secrets=[secret.decode(errors="replace")] if secret else [], **kw)
        self._key = secret

    def render(self, alert: Mapping[str, Any], raw: bytes, now_s: float) -> HttpRequest:
        headers = {
            "Content-Type": "application/json",
            "User-Agent": USER_AGENT,
            EVENT_ID_HEADER: str(alert.get("event_id", "")),
            DEDUP_KEY_HEADER: str(alert.get("dedup_key", "")),
            **self.extra_headers,
        }
        if self._key:
            ts = int(now_s)
            headers[TIMESTAMP_HEADER] = str(ts)
            headers[SIGNATURE_HEADER] = sign(self._key, ts, raw)
        return HttpRequest(self.url, raw, headers)


class SlackReceiver(Receiver):
    kind = "slack"
    default_rate = 1.0  # Slack allows about one message per second per incoming webhook

    def __init__(self, name: str, url: str, **kw: Any) -> None:
        super().__init__(name, url, secrets=[url], **kw)  # the URL embeds the webhook's key

    def render(self, alert: Mapping[str, Any], raw: bytes, now_s: float) -> HttpRequest:
        return self._json(self.url, slack_payload(alert))


class PagerDutyReceiver(Receiver):
    kind = "pagerduty"
    default_rate = 2.0  # Events API v2: 120 events/min per routing key

    def __init__(self, name: str, url: str, *, routing_key: str, **kw: Any) -> None:
        super().__init__(name, url or PAGERDUTY_URL, secrets=[routing_key], **kw)
        self._routing_key = routing_key

    def render(self, alert: Mapping[str, Any], raw: bytes, now_s: float) -> HttpRequest:
        return self._json(self.url, pagerduty_payload(alert, self._routing_key))


class AlertmanagerReceiver(Receiver):
    kind = "alertmanager"

    def __init__(self, name: str, url: str, *, firing_ttl_s: float = 86_400.0, **kw: Any) -> None:
        base = url.rstrip("/")
        super().__init__(name, base if base.endswith("/api/v2/alerts") else base + "/api/v2/alerts", **kw)
        self.firing_ttl_s = firing_ttl_s

    def render(self, alert: Mapping[str, Any], raw: bytes, now_s: float) -> HttpRequest:
        return self._json(self.url, alertmanager_payload(alert, now_s=now_s, firing_ttl_s=self.firing_ttl_s))


RECEIVER_KINDS: dict[str, type[Receiver]] = {
    k.kind: k for k in (WebhookReceiver, SlackReceiver, PagerDutyReceiver, AlertmanagerReceiver)
}


# -- routing -------------------------------------------------------------------------------------------


class RoutesConfigError(ValueError):
    """The routes file is invalid (the message never contains a secret value)."""


@dataclass(frozen=True)
class Route:
    """Matches alerts on all given criteria (None = any); first match wins unless ``continue_``."""

    receivers: tuple[str, ...]
    severities: frozenset[str] | None = None
    min_severity: str | None = None
    groups: tuple[str, ...] | None = None  # fnmatch patterns
    devices: tuple[str, ...] | None = None  # fnmatch patterns
    kinds: frozenset[str] | None = None
    continue_: bool = False

    def matches(self, alert: Mapping[str, Any]) -> bool:
        severity = str(alert.get("severity", ""))
        if self.severities is not None and severity not in self.severities:
            return False
        if self.min_severity is not None and severity_rank(severity) < severity_rank(self.min_severity):
            return False
        if self.kinds is not None and alert.get("kind") not in self.kinds:
            return False
        if self.groups is not None and not any(fnmatch.fnmatchcase(str(alert.get("group")), g) for g in self.groups):
            return False
        if self.devices is not None:
            device = alert.get("device_id")
            if device is None or not any(fnmatch.fnmatchcase(str(device), d) for d in self.devices):
                return False
        return True


@dataclass
class Router:
    receivers: dict[str, Receiver] = field(default_factory=dict)
    routes: list[Route] = field(default_factory=list)

    def route(self, alert: Mapping[str, Any]) -> list[Receiver]:
        """The receivers of an alert, in route order, each once."""
        names: list[str] = []
        for r in self.routes:
            if r.matches(alert):
                names.extend(n for n in r.receivers if n not in names)
                if not r.continue_:
                    break
        return [self.receivers[n] for n in names]


@dataclass(frozen=True)
class ReceiverDefaults:
    retry: RetryPolicy = RetryPolicy()
    timeout_s: float = 10.0


def _secret(cfg: Mapping[str, Any], key: str, where: str, environ: Mapping[str, str], base: Path) -> str | None:
    """A value from ``<key>_env`` or ``<key>_file`` (None if neither is given)."""
    env_name, file_name = cfg.get(f"{key}_env"), cfg.get(f"{key}_file")
    if env_name is not None and file_name is not None:
        raise RoutesConfigError(f"{where}: give {key}_env or {key}_file, not both")
    if env_name is not None:
        value = environ.get(str(env_name))
        if not value:
            raise RoutesConfigError(f"{where}: environment variable {env_name} ({key}) is not set")
        return value.strip()
    if file_name is not None:
        path = Path(str(file_name))
        path = path if path.is_absolute() else base / path
        try:
            value = path.read_text().strip()
        except OSError as exc:
            raise RoutesConfigError(f"{where}: cannot read {key}_file {path}: {exc.strerror}") from None
        if not value:
            raise RoutesConfigError(f"{where}: {key}_file {path} is empty")
        return value
    return None


_COMMON_KEYS = {
    "type",
    "url",
    "url_env",
    "url_file",
    "timeout_s",
    "rate_per_s",
    "burst",
    "headers",
    "max_attempts",
    "base_delay_s",
    "max_delay_s",
    "max_retry_after_s",
    "budget_s",
    "circuit_open_s",
}
_KIND_KEYS = {
    "webhook": {"secret_env", "secret_file"},
    "slack": set(),
    "pagerduty": {"routing_key_env", "routing_key_file"},
    "alertmanager": {"firing_ttl_s"},
}


def _receiver(
    name: str, cfg: Mapping[str, Any], environ: Mapping[str, str], base: Path, d: ReceiverDefaults
) -> Receiver:
    where = f"receiver {name!r}"
    if not isinstance(cfg, Mapping):
        raise RoutesConfigError(f"{where}: expected a mapping")
    kind = cfg.get("type")
    if kind not in RECEIVER_KINDS:
        raise RoutesConfigError(f"{where}: type must be one of {sorted(RECEIVER_KINDS)}, got {kind!r}")
    unknown = set(cfg) - _COMMON_KEYS - _KIND_KEYS[kind]
    if unknown:
        hint = " (secrets come from <key>_env or <key>_file)" if unknown & {"secret", "routing_key"} else ""
        raise RoutesConfigError(f"{where}: unknown keys {sorted(unknown)}{hint}")
    url = _secret(cfg, "url", where, environ, base)
    if url is not None and "url" in cfg:
        raise RoutesConfigError(f"{where}: give one of url, url_env, url_file")
    url = url if url is not None else cfg.get("url")
    if not url and kind != "pagerduty":
        raise RoutesConfigError(f"{where}: url (or url_env / url_file) is required")
    retry = RetryPolicy(
        max_attempts=int(cfg.get("max_attempts", d.retry.max_attempts)),
        base_delay_s=float(cfg.get("base_delay_s", d.retry.base_delay_s)),
        max_delay_s=float(cfg.get("max_delay_s", d.retry.max_delay_s)),
        max_retry_after_s=float(cfg.get("max_retry_after_s", d.retry.max_retry_after_s)),
        budget_s=float(cfg.get("budget_s", d.retry.budget_s)),
        circuit_open_s=float(cfg.get("circuit_open_s", d.retry.circuit_open_s)),
    )
    kw: dict[str, Any] = {
        "retry": retry,
        "timeout_s": float(cfg.get("timeout_s", d.timeout_s)),
        "burst": float(cfg.get("burst", 10.0)),
        "headers": {str(k): str(v) for k, v in (cfg.get("headers") or {}).items()},
    }
    if "rate_per_s" in cfg:
        kw["rate_per_s"] = float(cfg["rate_per_s"])
    if kind == "webhook":
        secret = _secret(cfg, "secret", where, environ, base)
        if secret is None:
            log.warning("%s: no secret_env/secret_file: requests will not be signed", where)
        return WebhookReceiver(name, str(url), secret=secret.encode() if secret else None, **kw)
    if kind == "slack":
        return SlackReceiver(name, str(url), **kw)
    if kind == "pagerduty":
        key = _secret(cfg, "routing_key", where, environ, base)
        if key is None:
            raise RoutesConfigError(f"{where}: routing_key_env or routing_key_file is required")
        return PagerDutyReceiver(name, str(url or ""), routing_key=key, **kw)
    return AlertmanagerReceiver(name, str(url), firing_ttl_s=float(cfg.get("firing_ttl_s", 86_400.0)), **kw)


def _strings(value: Any, where: str) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise RoutesConfigError(f"{where}: expected a string or a list of strings")


def _route(i: int, cfg: Any, receivers: Mapping[str, Receiver]) -> Route:
    where = f"route {i}"
    if not isinstance(cfg, Mapping):
        raise RoutesConfigError(f"{where}: expected a mapping")
    unknown = set(cfg) - {"match", "receivers", "continue"}
    if unknown:
        raise RoutesConfigError(f"{where}: unknown keys {sorted(unknown)}")
    names = _strings(cfg.get("receivers", []), f"{where}.receivers")
    missing = [n for n in names if n not in receivers]
    if missing:
        raise RoutesConfigError(f"{where}: unknown receivers {missing}")
    match = cfg.get("match") or {}
    if not isinstance(match, Mapping):
        raise RoutesConfigError(f"{where}.match: expected a mapping")
    unknown = set(match) - {"severity", "min_severity", "group", "device", "kind"}
    if unknown:
        raise RoutesConfigError(f"{where}.match: unknown keys {sorted(unknown)}")
    severities = frozenset(_strings(match["severity"], f"{where}.match.severity")) if "severity" in match else None
    min_severity = match.get("min_severity")
    for s in [*(severities or ()), *([min_severity] if min_severity else [])]:
        if s not in SEVERITIES:
            raise RoutesConfigError(f"{where}.match: unknown severity {s!r} (one of {list(SEVERITIES)})")
    return Route(
        receivers=names,
        severities=severities,
        min_severity=min_severity,
        groups=_strings(match["group"], f"{where}.match.group") if "group" in match else None,
        devices=_strings(match["device"], f"{where}.match.device") if "device" in match else None,
        kinds=frozenset(_strings(match["kind"], f"{where}.match.kind")) if "kind" in match else None,
        continue_=bool(cfg.get("continue", False)),
    )


def router_from_config(
    doc: Any, environ: Mapping[str, str], *, base_dir: Path = Path("."), defaults: ReceiverDefaults | None = None
) -> Router:
    """A Router from a parsed routes document (``{"receivers": {...}, "routes": [...]}``)."""
    if not isinstance(doc, Mapping):
        raise RoutesConfigError("routes file: expected a mapping with receivers and routes")
    unknown = set(doc) - {"receivers", "routes"}
    if unknown:
        raise RoutesConfigError(f"routes file: unknown keys {sorted(unknown)}")
    d = defaults or ReceiverDefaults()
    raw_receivers = doc.get("receivers") or {}
    if not isinstance(raw_receivers, Mapping):
        raise RoutesConfigError("receivers: expected a mapping of name -> receiver")
    receivers = {str(n): _receiver(str(n), c, environ, base_dir, d) for n, c in raw_receivers.items()}
    routes = [_route(i, r, receivers) for i, r in enumerate(doc.get("routes") or [])]
    return Router(receivers, routes)


def load_router(path: Path, environ: Mapping[str, str], defaults: ReceiverDefaults | None = None) -> Router:
    """Load a routes file (``.json``, else YAML); relative secret files are relative to the file."""
    text = Path(path).read_text()
    if Path(path).suffix == ".json":
        doc = json.loads(text)
    else:
        import yaml

        doc = yaml.safe_load(text)
    return router_from_config(doc, environ, base_dir=Path(path).resolve().parent, defaults=defaults)
