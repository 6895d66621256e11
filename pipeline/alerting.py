"""Alert lifecycles from scores: hysteresis, cooldown, dedup keys, severity, device groups, storm guard.

Pure: no I/O, no clock. :class:`AlertEngine` takes score records (the JSON of ``<prefix>.scores``) one at
a time, in order per device, and returns :class:`AlertEvent` records for the ``<prefix>.alerts`` outbox.
All times are event times (the scores' ``ts``), so a replay of the same scores yields the same alerts with
the same dedup keys.

Per device (``ok`` scores only; ``warming_up`` or score-less steps are neutral: they change no streak)::

    ok --above--> pending --above x open_steps (and past cooldown)--> firing   => trigger
    pending --below--> ok
    firing --below--> resolving --below x resolve_steps--> ok (+ cooldown)      => resolve
    resolving --above--> firing

``above`` is the score's ``is_anomaly``. The incident's dedup key is ``<prefix>:<device>:<opened_at>``
where ``opened_at`` is the ts of the first above-threshold step of the streak that opened it. After a
resolve, the device cannot open a new incident before ``ts >= resolved + cooldown_ms``; a streak that is
still going when the cooldown ends opens the incident at once (keeping the streak's first ts).

Severity is fixed when the incident opens (so receivers that key on it, such as Alertmanager labels, see
the same value on resolve): the band of the highest ``score / threshold`` over the opening streak.
The peak keeps being tracked and is reported on resolve.

Storm guard, per scope (the fleet, and each device group when groups are configured): a device is
*active* when it has sent a score within ``storm_window_ms`` of the newest ts seen, *alerting* when it
is pending or has an open incident, *firing* when it has an open incident. A storm starts when
``firing >= storm_min_devices`` and ``alerting > storm_share x active``; it ends when
``alerting <= storm_clear_share x active``. While a scope's storm is active, device triggers in it are
written to the outbox with ``suppressed=true`` (the deliverer skips them) and one storm alert
(kind ``storm``) stands for them. A resolve is suppressed exactly when its trigger was. When a storm ends,
incidents of its scope that are still firing and were never notified are notified then (trigger events
with their original dedup key and ``repeat=true``); incidents already recovering resolve silently unless
they go back above threshold first (then they are notified). A group storm during a fleet storm is itself
suppressed, and notified when the fleet storm ends while it lasts.

State survives restarts: :meth:`AlertEngine.checkpoint` serialises the touched devices (and the storm
state under :data:`STORM_KEY`); :meth:`AlertEngine.load` rebuilds the engine from such blobs.
Scores with a ts not newer than the device's last one are skipped (the scores topic is at-least-once).
"""

from __future__ import annotations

import heapq
import math
import urllib.parse
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from enum import StrEnum

import msgspec

from connectors.alert_delivery import SEVERITIES, severity_rank
from pipeline.groups import device_grouper
from pipeline.settings import Settings

SCHEMA_VERSION = 1
STORM_KEY = b"\x00storms"
FLEET = "fleet"


class Phase(StrEnum):
    OK = "ok"
    PENDING = "pending"
    FIRING = "firing"
    RESOLVING = "resolving"


class Action(StrEnum):
    TRIGGER = "trigger"
    RESOLVE = "resolve"


class Kind(StrEnum):
    DEVICE = "device"
    STORM = "storm"


# -- wire records ------------------------------------------------------------------------------------


class ScoreIn(msgspec.Struct):
    """The fields of a score record (``pipeline.records.score_json``) the alerter uses."""

    device_id: str
    ts: int
    status: str
    score: float | None
    threshold: float
    is_anomaly: bool
    top_sensor: str | None = None
    values: dict[str, float | None] = {}
    forecast: dict[str, float | None] | None = None
    model_version: str = ""


class Link(msgspec.Struct):
    name: str
    url: str


class AlertEvent(msgspec.Struct, kw_only=True):
    """One record of the ``<prefix>.alerts`` outbox (JSON). ``event_id`` = ``<dedup_key>:<action>``."""

    schema: int = SCHEMA_VERSION
    event_id: str
    action: str
    kind: str
    scope: str  # "device", "group:<name>" or "fleet"
    dedup_key: str
    device_id: str | None
    group: str
    severity: str
    summary: str
    score: float | None = None
    threshold: float | None = None
    ratio: float | None = None
    top_sensors: list[str] = []
    sensors: dict[str, dict[str, float | None]] = {}
    model_version: str = ""
    opened_at: int
    triggered_at: int
    resolved_at: int | None = None
    steps_above: int = 0
    device_count: int = 1
    fleet_size: int = 0
    devices: list[str] = []
    links: list[Link] = []
    suppressed: bool = False
    suppressed_by: str | None = None
    repeat: bool = False  # a trigger for an incident whose first trigger was suppressed by a storm
    emitted_at: int = 0


_score_decoder = msgspec.json.Decoder(ScoreIn)
_event_encoder = msgspec.json.Encoder()
_event_decoder = msgspec.json.Decoder(AlertEvent)


def decode_score(raw: bytes) -> ScoreIn:
    """Decode a score record; raises msgspec.ValidationError / DecodeError on bad input."""
    return _score_decoder.decode(raw)


def encode_event(event: AlertEvent) -> bytes:
    return _event_encoder.encode(event)


def decode_event(raw: bytes) -> AlertEvent:
    return _event_decoder.decode(raw)


# -- policy ------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SeverityBand:
    name: str
    min_ratio: float


DEFAULT_BANDS = (SeverityBand("critical", 3.0), SeverityBand("major", 2.0), SeverityBand("warning", 1.0))


def parse_severity_bands(text: str) -> tuple[SeverityBand, ...]:
    """``"critical:3,major:2,warning:1"`` -> bands sorted by ratio, highest first."""
    bands = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        name, sep, ratio = part.partition(":")
        name = name.strip()
        if not sep or name not in SEVERITIES:
            raise ValueError(f"bad severity band {part!r}: expected <{'|'.join(SEVERITIES)}>:<min ratio>")
        bands.append(SeverityBand(name, float(ratio)))
    if not bands:
        raise ValueError("no severity bands")
    return tuple(sorted(bands, key=lambda b: -b.min_ratio))


def severity_for(ratio: float, bands: tuple[SeverityBand, ...]) -> str:
    for band in bands:
        if ratio >= band.min_ratio:
            return band.name
    return "info"


@dataclass(frozen=True)
class AlertPolicy:
    open_steps: int = 3
    resolve_steps: int = 5
    cooldown_ms: int = 60_000
    bands: tuple[SeverityBand, ...] = DEFAULT_BANDS
    top_sensors: int = 3
    grafana_url: str = ""
    group_pattern: str = ""
    storm_share: float = 0.2
    storm_clear_share: float | None = None
    storm_min_devices: int = 5
    storm_window_ms: int = 60_000
    storm_sample: int = 20
    key_prefix: str = "iotad"
    _grouper: Callable[[str], str] = field(init=False, repr=False, compare=False, default=device_grouper(""))

    def __post_init__(self) -> None:
        if self.open_steps < 1 or self.resolve_steps < 1:
            raise ValueError("open_steps and resolve_steps must be >= 1")
        if self.cooldown_ms < 0 or self.storm_window_ms <= 0:
            raise ValueError("cooldown_ms must be >= 0 and storm_window_ms > 0")
        if not 0.0 <= self.storm_share <= 1.0:
            raise ValueError("storm_share must be within [0, 1] (0 = storm guard off)")
        object.__setattr__(self, "_grouper", device_grouper(self.group_pattern))

    @property
    def clear_share(self) -> float:
        return self.storm_share / 2 if self.storm_clear_share is None else self.storm_clear_share

    @property
    def storms_enabled(self) -> bool:
        return self.storm_share > 0

    def group_of(self, device_id: str) -> str:
        """The device's group (see :func:`pipeline.groups.device_grouper`)."""
        return self._grouper(device_id)

    def link(self, *, device: str, group: str, dedup_key: str, from_ms: int, to_ms: int | None) -> list[Link]:
        """Grafana link from the template: ``{device} {group} {dedup_key} {from_ms} {to_ms}``, URL-quoted."""
        if not self.grafana_url:
            return []
        values = {
            "device": device,
            "group": group,
            "dedup_key": dedup_key,
            "from_ms": str(from_ms),
            "to_ms": "now" if to_ms is None else str(to_ms),
        }
        quoted = {k: urllib.parse.quote(v, safe="") for k, v in values.items()}
        return [Link("grafana", self.grafana_url.format_map(_Missing(quoted)))]


class _Missing(dict[str, str]):
    def __missing__(self, key: str) -> str:  # unknown placeholders stay as written
        return "{" + key + "}"


# -- persisted state ---------------------------------------------------------------------------------


class Incident(msgspec.Struct):
    dedup_key: str
    opened_ts: int
    triggered_ts: int = 0
    severity: str = "info"
    peak_score: float = 0.0
    peak_ratio: float = 0.0
    peak_ts: int = 0
    threshold: float = 0.0
    top_counts: dict[str, int] = {}
    sensors: dict[str, list[float | None]] = {}  # at the peak step: name -> [value, forecast]
    model_version: str = ""
    steps_above: int = 0
    notified: bool = False
    suppressed_by: str | None = None
    resolving_since: int = 0


class DeviceState(msgspec.Struct):
    group: str
    phase: str = Phase.OK
    streak: int = 0  # consecutive above (ok/pending) or below (resolving) steps
    incident: Incident | None = None  # candidate while pending, open while firing/resolving
    cooldown_until: int = 0
    last_ts: int = -1
    partition: int = 0


class StormState(msgspec.Struct):
    scope: str
    active: bool = False
    dedup_key: str = ""
    started_ts: int = 0
    severity: str = "critical"
    notified: bool = False
    suppressed_by: str | None = None
    device_count: int = 0
    fleet_size: int = 0
    devices: list[str] = []


class StormBlob(msgspec.Struct):
    now: int
    storms: list[StormState]


_state_encoder = msgspec.json.Encoder()
_state_decoder = msgspec.json.Decoder(DeviceState)
_storm_decoder = msgspec.json.Decoder(StormBlob)


@dataclass(slots=True)
class _Counts:
    active: int = 0
    alerting: int = 0
    firing: int = 0


def _contrib(st: DeviceState) -> tuple[bool, bool]:
    """(alerting, firing) of a device state."""
    firing = st.phase in (Phase.FIRING, Phase.RESOLVING)
    return firing or st.phase == Phase.PENDING, firing


def _ratio(score: float, threshold: float) -> float:
    if threshold > 0:
        return score / threshold
    return math.inf if score > 0 else 0.0


@dataclass
class EngineStats:
    scores: int = 0
    duplicates: int = 0
    opened: int = 0
    resolved: int = 0
    suppressed: int = 0


class AlertEngine:
    """Per-device alert lifecycles and the storm guard (see the module docstring)."""

    def __init__(self, policy: AlertPolicy) -> None:
        self.policy = policy
        self._reset()

    def _reset(self) -> None:
        self.devices: dict[str, DeviceState] = {}
        self.storms: dict[str, StormState] = {}
        self.now = 0  # newest event ts seen
        self.dirty: set[str] = set()
        self.storms_dirty = False
        self.stats = EngineStats()
        self._active: set[str] = set()
        self._heap: list[tuple[int, str]] = []  # (last_ts, device) of active devices, lazily refreshed
        self._counts: dict[str, _Counts] = {}

    # -- public API ------------------------------------------------------------------------------

    def process(self, s: ScoreIn, partition: int = 0) -> list[AlertEvent]:
        """Apply one score; return the alert events it causes (in order)."""
        st = self.devices.get(s.device_id)
        if st is None:
            st = self.devices[s.device_id] = DeviceState(group=self.policy.group_of(s.device_id))
        if s.ts <= st.last_ts:
            self.stats.duplicates += 1
            return []
        self.stats.scores += 1
        was_active = s.device_id in self._active
        before = _contrib(st) if was_active else None
        events: list[AlertEvent] = []
        transition = self._step(s, st)
        st.last_ts = s.ts
        st.partition = partition
        self.dirty.add(s.device_id)
        if not was_active:
            self._active.add(s.device_id)
            heapq.heappush(self._heap, (s.ts, s.device_id))
        self._apply(st.group, before, _contrib(st), activate=not was_active)
        self.now = max(self.now, s.ts)
        scopes = {self._scope(st.group)} | self._expire()
        # Storms first, so that the trigger of the device that starts a storm is already suppressed.
        events.extend(self._evaluate_storms(scopes, s.ts, s.device_id if transition is not None else None))
        if transition is not None:
            events.append(self._device_event(s.device_id, st, transition, s.ts))
        return events

    def checkpoint(self, devices: Iterable[str]) -> dict[str, tuple[int, bytes]]:
        """device -> (partition, serialised state) for the given devices."""
        out = {}
        for d in devices:
            st = self.devices.get(d)
            if st is not None:
                out[d] = (st.partition, _state_encoder.encode(st))
        return out

    def storm_blob(self) -> bytes:
        return _state_encoder.encode(StormBlob(self.now, list(self.storms.values())))

    def take_dirty(self) -> tuple[set[str], bool]:
        """The devices (and whether the storm state) changed since the last call."""
        dirty, storms = self.dirty, self.storms_dirty
        self.dirty, self.storms_dirty = set(), False
        return dirty, storms

    def load(self, blobs: Iterable[tuple[bytes, bytes]]) -> None:
        """Replace the state with checkpoints: (key, blob) pairs of device ids and :data:`STORM_KEY`.

        Keys starting with NUL other than STORM_KEY (changelog markers) and empty blobs are ignored.
        """
        self._reset()
        for key, blob in blobs:
            if not blob:
                continue
            if key == STORM_KEY:
                sb = _storm_decoder.decode(blob)
                self.now = max(self.now, sb.now)
                self.storms = {x.scope: x for x in sb.storms}
            elif not key.startswith(b"\x00"):
                st = _state_decoder.decode(blob)
                self.devices[key.decode()] = st
                self.now = max(self.now, st.last_ts)
        horizon = self.now - self.policy.storm_window_ms
        for device, st in self.devices.items():
            if st.last_ts >= horizon:
                self._active.add(device)
                self._heap.append((st.last_ts, device))
                self._apply(st.group, None, _contrib(st), activate=True)
        heapq.heapify(self._heap)

    def counts(self, scope: str = FLEET) -> tuple[int, int, int]:
        """(active, alerting, firing) devices of a scope."""
        c = self._counts.get(scope, _Counts())
        return c.active, c.alerting, c.firing

    def firing(self) -> int:
        return sum(1 for st in self.devices.values() if st.phase in (Phase.FIRING, Phase.RESOLVING))

    # -- per-device lifecycle ----------------------------------------------------------------------

    def _step(self, s: ScoreIn, st: DeviceState) -> Action | None:
        if s.status != "ok" or s.score is None or not math.isfinite(s.score):
            return None  # neutral step
        p = self.policy
        above = bool(s.is_anomaly)
        if st.phase in (Phase.OK, Phase.PENDING):
            if not above:
                st.phase, st.streak, st.incident = Phase.OK, 0, None
                return None
            if st.incident is None:
                st.incident = Incident(dedup_key=f"{p.key_prefix}:{s.device_id}:{s.ts}", opened_ts=s.ts)
            st.streak += 1
            self._accumulate(st.incident, s)
            st.phase = Phase.PENDING
            if st.streak >= p.open_steps and s.ts >= st.cooldown_until:
                st.incident.triggered_ts = s.ts
                st.incident.severity = severity_for(st.incident.peak_ratio, p.bands)
                st.phase, st.streak = Phase.FIRING, 0
                return Action.TRIGGER
            return None
        open_incident = st.incident
        assert open_incident is not None
        if above:
            self._accumulate(open_incident, s)
            # Back above threshold after a storm that held its trigger back ended: notify it now.
            refire = (
                st.phase == Phase.RESOLVING and not open_incident.notified and self._covering_storm(st.group) is None
            )
            st.phase, st.streak = Phase.FIRING, 0
            return Action.TRIGGER if refire else None
        if st.phase == Phase.FIRING:
            st.phase, st.streak = Phase.RESOLVING, 0
            open_incident.resolving_since = s.ts
        st.streak += 1
        if st.streak >= p.resolve_steps:
            st.phase, st.streak = Phase.OK, 0
            st.cooldown_until = s.ts + p.cooldown_ms
            return Action.RESOLVE
        return None

    def _accumulate(self, inc: Incident, s: ScoreIn) -> None:
        assert s.score is not None
        inc.steps_above += 1
        if s.top_sensor:
            inc.top_counts[s.top_sensor] = inc.top_counts.get(s.top_sensor, 0) + 1
        ratio = _ratio(s.score, s.threshold)
        if inc.steps_above == 1 or ratio > inc.peak_ratio:
            inc.peak_ratio, inc.peak_score, inc.peak_ts, inc.threshold = ratio, s.score, s.ts, s.threshold
            inc.model_version = s.model_version
            ranked = self._top(inc)
            forecast = s.forecast or {}
            inc.sensors = {n: [s.values.get(n), forecast.get(n)] for n in ranked if n in s.values}

    def _top(self, inc: Incident) -> list[str]:
        ranked = sorted(inc.top_counts.items(), key=lambda kv: (-kv[1], kv[0]))
        return [name for name, _ in ranked[: self.policy.top_sensors]]

    def _device_event(self, device: str, st: DeviceState, action: Action, ts: int) -> AlertEvent:
        inc = st.incident
        assert inc is not None
        if action is Action.TRIGGER:
            repeat = inc.triggered_ts != ts
            self.stats.opened += not repeat
            storm = self._covering_storm(st.group)
            inc.notified = storm is None
            inc.suppressed_by = storm.dedup_key if storm else None
            ev = self._incident_event(device, st.group, inc, Action.TRIGGER, repeat=repeat)
        else:
            self.stats.resolved += 1
            ev = self._incident_event(device, st.group, inc, Action.RESOLVE, resolved_at=inc.resolving_since)
            st.incident = None
        if ev.suppressed:
            self.stats.suppressed += 1
        return ev

    def _incident_event(
        self,
        device: str,
        group: str,
        inc: Incident,
        action: Action,
        resolved_at: int | None = None,
        *,
        repeat: bool = False,
    ) -> AlertEvent:
        top = self._top(inc)
        ratio = inc.peak_ratio if math.isfinite(inc.peak_ratio) else None
        if action is Action.TRIGGER:
            sensors = f"; top sensors: {', '.join(top)}" if top else ""
            summary = (
                f"[{inc.severity}] Anomaly on {device} (group {group}): score {inc.peak_score:.2f} "
                f"> threshold {inc.threshold:.2f} for {inc.steps_above} steps{sensors}"
            )
        else:
            summary = (
                f"Resolved: anomaly on {device} (group {group}) after {inc.steps_above} steps above threshold, "
                f"peak score {inc.peak_score:.2f}"
            )
        return AlertEvent(
            event_id=f"{inc.dedup_key}:{action}",
            action=action,
            kind=Kind.DEVICE,
            scope="device",
            dedup_key=inc.dedup_key,
            device_id=device,
            group=group,
            severity=inc.severity,
            summary=summary,
            score=inc.peak_score,
            threshold=inc.threshold,
            ratio=ratio,
            top_sensors=top,
            sensors={n: {"value": v[0], "forecast": v[1]} for n, v in inc.sensors.items()},
            model_version=inc.model_version,
            opened_at=inc.opened_ts,
            triggered_at=inc.triggered_ts,
            resolved_at=resolved_at,
            steps_above=inc.steps_above,
            links=self.policy.link(
                device=device, group=group, dedup_key=inc.dedup_key, from_ms=inc.opened_ts, to_ms=resolved_at
            ),
            suppressed=not inc.notified,
            suppressed_by=None if inc.notified else inc.suppressed_by,
            repeat=repeat,
        )

    # -- storm guard ------------------------------------------------------------------------------

    def _scope(self, group: str) -> str:
        return f"group:{group}"

    def _apply(self, group: str, before: tuple[bool, bool] | None, after: tuple[bool, bool], *, activate: bool) -> None:
        scopes = [FLEET, self._scope(group)] if self.policy.group_pattern else [FLEET]
        for scope in scopes:
            c = self._counts.get(scope)
            if c is None:
                c = self._counts[scope] = _Counts()
            if activate:
                c.active += 1
            if before is not None:
                c.alerting -= before[0]
                c.firing -= before[1]
            c.alerting += after[0]
            c.firing += after[1]

    def _remove(self, group: str, st: DeviceState) -> None:
        alerting, firing = _contrib(st)
        scopes = [FLEET, self._scope(group)] if self.policy.group_pattern else [FLEET]
        for scope in scopes:
            c = self._counts[scope]
            c.active -= 1
            c.alerting -= alerting
            c.firing -= firing

    def _expire(self) -> set[str]:
        """Deactivate devices not seen within the storm window; return the scopes touched."""
        horizon = self.now - self.policy.storm_window_ms
        touched: set[str] = set()
        heap = self._heap
        while heap and heap[0][0] < horizon:
            _, device = heapq.heappop(heap)
            st = self.devices[device]
            if st.last_ts >= horizon:
                heapq.heappush(heap, (st.last_ts, device))
                continue
            self._active.discard(device)
            self._remove(st.group, st)
            touched.add(self._scope(st.group))
        return touched

    def _covering_storm(self, group: str) -> StormState | None:
        """The active storm (fleet first, then the device's group) that suppresses this group's alerts."""
        for scope in (FLEET, self._scope(group)):
            storm = self.storms.get(scope)
            if storm is not None and storm.active:
                return storm
        return None

    def _evaluate_storms(self, scopes: set[str], ts: int, transitioning: str | None) -> list[AlertEvent]:
        p = self.policy
        if not p.storms_enabled:
            return []
        events: list[AlertEvent] = []
        ordered = [FLEET, *sorted(s for s in scopes if s != FLEET and p.group_pattern)]
        for scope in ordered:
            c = self._counts.get(scope, _Counts())
            storm = self.storms.get(scope)
            active = storm is not None and storm.active
            if not active and c.firing >= p.storm_min_devices and c.alerting > p.storm_share * c.active:
                events.extend(self._start_storm(scope, ts, c))
            elif active and c.alerting <= p.clear_share * c.active:
                events.extend(self._end_storm(scope, ts, transitioning))
        return events

    def _in_scope(self, scope: str, st: DeviceState) -> bool:
        return scope == FLEET or scope == self._scope(st.group)

    def _start_storm(self, scope: str, ts: int, c: _Counts) -> list[AlertEvent]:
        firing = sorted(
            (d, st)
            for d, st in self.devices.items()
            if d in self._active and self._in_scope(scope, st) and st.phase in (Phase.FIRING, Phase.RESOLVING)
        )
        severities = [st.incident.severity for _, st in firing if st.incident is not None]
        severity = max(severities, key=severity_rank) if severities else "warning"
        fleet = self.storms.get(FLEET)
        covering = fleet if scope != FLEET and fleet is not None and fleet.active else None
        storm = StormState(
            scope=scope,
            active=True,
            dedup_key=f"{self.policy.key_prefix}:storm:{scope}:{ts}",
            started_ts=ts,
            severity=severity,
            notified=covering is None,
            suppressed_by=covering.dedup_key if covering else None,
            device_count=c.alerting,
            fleet_size=c.active,
            devices=[d for d, _ in firing[: self.policy.storm_sample]],
        )
        self.storms[scope] = storm
        self.storms_dirty = True
        self.stats.opened += 1
        if not storm.notified:
            self.stats.suppressed += 1
        return [self._storm_event(storm, Action.TRIGGER, ts)]

    def _end_storm(self, scope: str, ts: int, transitioning: str | None) -> list[AlertEvent]:
        storm = self.storms[scope]
        storm.active = False
        self.storms_dirty = True
        self.stats.resolved += 1
        events = [self._storm_event(storm, Action.RESOLVE, ts)]
        if not storm.notified:
            self.stats.suppressed += 1
        # Catch up: what this storm held back and no other active storm covers now.
        if scope == FLEET:
            for other in sorted(self.storms.values(), key=lambda x: x.scope):
                if other.active and not other.notified:
                    other.notified, other.suppressed_by = True, None
                    events.append(self._storm_event(other, Action.TRIGGER, ts))
        for device, st in sorted(self.devices.items()):
            inc = st.incident
            if (
                inc is None
                or device == transitioning  # its own event follows
                or inc.notified
                or st.phase != Phase.FIRING  # recovering ones resolve silently (or notify if they re-fire)
                or not self._in_scope(scope, st)
                or self._covering_storm(st.group) is not None
            ):
                continue
            inc.notified, inc.suppressed_by = True, None
            self.dirty.add(device)
            events.append(self._incident_event(device, st.group, inc, Action.TRIGGER, repeat=True))
        return events

    def _storm_event(self, storm: StormState, action: Action, ts: int) -> AlertEvent:
        where = "the fleet" if storm.scope == FLEET else storm.scope.replace("group:", "group ", 1)
        pct = 100.0 * storm.device_count / storm.fleet_size if storm.fleet_size else 0.0
        if action is Action.TRIGGER:
            summary = (
                f"[{storm.severity}] Alert storm in {where}: {storm.device_count} of {storm.fleet_size} "
                f"devices ({pct:.0f}%) alerting; per-device alerts are grouped into this one"
            )
        else:
            summary = f"Resolved: alert storm in {where}"
        group = storm.scope.removeprefix("group:") if storm.scope != FLEET else FLEET
        return AlertEvent(
            event_id=f"{storm.dedup_key}:{action}",
            action=action,
            kind=Kind.STORM,
            scope=storm.scope,
            dedup_key=storm.dedup_key,
            device_id=None,
            group=group,
            severity=storm.severity,
            summary=summary,
            opened_at=storm.started_ts,
            triggered_at=storm.started_ts,
            resolved_at=ts if action is Action.RESOLVE else None,
            device_count=storm.device_count,
            fleet_size=storm.fleet_size,
            devices=list(storm.devices),
            links=self.policy.link(
                device="",
                group=group,
                dedup_key=storm.dedup_key,
                from_ms=storm.started_ts,
                to_ms=ts if action is Action.RESOLVE else None,
            ),
            suppressed=not storm.notified,
            suppressed_by=None if storm.notified else storm.suppressed_by,
        )


def policy_from(s: Settings) -> AlertPolicy:
    """An AlertPolicy from Settings (``alert_*`` fields)."""
    return AlertPolicy(
        open_steps=s.alert_open_steps,
        resolve_steps=s.alert_resolve_steps,
        cooldown_ms=s.alert_cooldown_ms,
        bands=parse_severity_bands(s.alert_severity_bands),
        top_sensors=s.alert_top_sensors,
        grafana_url=s.alert_grafana_url,
        group_pattern=s.alert_group_pattern,
        storm_share=s.alert_storm_share,
        storm_clear_share=s.alert_storm_clear_share if s.alert_storm_clear_share >= 0 else None,
        storm_min_devices=s.alert_storm_min_devices,
        storm_window_ms=s.alert_storm_window_ms,
        storm_sample=s.alert_storm_sample,
        key_prefix=s.topic_prefix,
    )
