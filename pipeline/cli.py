"""The ``iotad`` command line (typer). Heavy imports live inside the commands that need them."""

from __future__ import annotations

import contextlib
import json
import logging
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, ParamSpec, TypeVar

import typer
from rich.console import Console
from rich.table import Table

from pipeline.settings import Settings

if TYPE_CHECKING:
    from models.registry import ModelRegistry

app = typer.Typer(
    help="iotad: streaming anomaly detection for IoT sensor fleets.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,  # locals can hold secrets (client configs); older typer showed them
)
bench_app = typer.Typer(help="Benchmarks (print JSON with --json).", no_args_is_help=True)
app.add_typer(bench_app, name="bench")
model_app = typer.Typer(
    help="The model registry (IOTAD_REGISTRY_URL): list, inspect, promote, roll back.", no_args_is_help=True
)
app.add_typer(model_app, name="model")
console = Console(stderr=True)


def _settings(**overrides: object) -> Settings:
    """The settings, with the Kafka security of ``kafka_bootstrap`` registered for every Kafka helper."""
    from pydantic import ValidationError
    from pydantic_settings.exceptions import SettingsError

    from connectors import kafka_security

    try:
        s = Settings()
        for k, v in overrides.items():
            if v is not None:
                setattr(s, k, v)
        kafka_security.register(s.kafka_bootstrap, kafka_security.KafkaSecurity.from_settings(s))
    except ValidationError as exc:  # never echo the input values: one of them may be a secret
        errors = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors(include_input=False))
        console.print(f"[red]invalid settings:[/] {errors}")
        raise typer.Exit(2) from None
    except (SettingsError, kafka_security.KafkaSecurityError) as exc:
        console.print(f"[red]invalid settings:[/] {exc}")
        raise typer.Exit(2) from None
    return s


def _print_summary(title: str, summary: dict[str, object], as_json: bool) -> None:
    table = Table(title=title)
    table.add_column("what")
    table.add_column("value", justify="right")
    for k, v in summary.items():
        table.add_row(k, json.dumps(v) if isinstance(v, dict | list) else str(v))
    console.print(table)
    if as_json:
        print(json.dumps(summary), flush=True)


@app.command()
def worker(
    metrics_port: Annotated[int | None, typer.Option(help="Override IOTAD_METRICS_PORT")] = None,
) -> None:
    """Run a Faust scoring worker (consumes <prefix>.readings until stopped)."""
    import faust

    from pipeline.app import create_app, freeze_startup_objects

    settings = _settings(metrics_port=metrics_port)
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    comp = create_app(settings)
    comp.metrics.serve(settings.metrics_host, settings.metrics_port)
    freeze_startup_objects()
    faust.Worker(comp.app, loglevel=settings.log_level, quiet=True).execute_from_commandline()


@app.command()
def alerter(
    metrics_port: Annotated[int | None, typer.Option(help="Override IOTAD_ALERT_METRICS_PORT")] = None,
) -> None:
    """Run the alerter: <prefix>.scores -> alert lifecycles -> <prefix>.alerts -> receivers (see ALERTING.md)."""
    import os

    import faust

    from pipeline.alert_agents import create_alerter, ensure_topics
    from pipeline.app import freeze_startup_objects

    settings = _settings(alert_metrics_port=metrics_port)
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    ensure_topics(settings)
    comp = create_alerter(settings, environ=os.environ)
    comp.metrics.serve(settings.metrics_host, settings.alert_metrics_port)
    freeze_startup_objects()
    faust.Worker(comp.app, loglevel=settings.log_level, quiet=True).execute_from_commandline()


@app.command("alerts-redrive")
def alerts_redrive(
    receiver: Annotated[str | None, typer.Option(help="Only dead letters of this receiver")] = None,
    limit: Annotated[int, typer.Option(help="Most dead letters to re-drive")] = 10_000,
) -> None:
    """Send dead-lettered alert deliveries (<prefix>.alerts.dlq) back to their receivers via <prefix>.alerts."""
    from pipeline.alert_agents import redrive

    counts = redrive(_settings(), receiver=receiver, limit=limit)
    _print_summary("alerts-redrive", dict(counts), False)


@app.command()
def up(
    duration: Annotated[float | None, typer.Option(help="Stop after this many seconds (default: Ctrl-C)")] = None,
    workers: Annotated[int, typer.Option(help="Scoring worker processes")] = 1,
    alerters: Annotated[int, typer.Option(help="`iotad alerter` processes (0 or 1; see ALERTING.md)")] = 0,
) -> None:
    """Start the embedded local stack (Tansu, InfluxDB, topics, workers) and keep it running."""
    from pipeline.stack import PipelineStack

    settings = _settings()
    stop = {"now": False}
    signal.signal(signal.SIGTERM, lambda *_: stop.update(now=True))
    with PipelineStack(settings, workers=workers, alerters=alerters) as stack:
        console.print(f"[bold]kafka[/] {stack.bootstrap}   [bold]influxdb[/] {stack.influx_url}")
        for w in [*stack.procs, *stack.alerter_procs]:
            url = f"http://127.0.0.1:{w.metrics_port}/metrics"
            console.print(f"{w.command} pid {w.pid}: metrics {url}, log {w.log_path}")
        console.print(f"export IOTAD_KAFKA_BOOTSTRAP={stack.bootstrap} IOTAD_INFLUX_URL={stack.influx_url}")
        deadline = time.monotonic() + duration if duration else float("inf")
        try:
            while not stop["now"] and time.monotonic() < deadline:
                time.sleep(0.5)
        except KeyboardInterrupt:
            pass
        console.print("stopping")


@app.command()
def simulate(
    devices: Annotated[int, typer.Option(help="Fleet size")] = 100,
    steps: Annotated[int, typer.Option(help="Steps to send per device")] = 600,
    realtime: Annotated[bool, typer.Option(help="Pace to the wall clock (one step per IOTAD_STEP_MS)")] = True,
    anomalies: Annotated[int | None, typer.Option(help="Exact number of injected anomalies")] = None,
    malformed_every: Annotated[int, typer.Option(help="One malformed message per N valid (0 = none)")] = 0,
    late_every: Annotated[int, typer.Option(help="One late reading per N valid (0 = none)")] = 0,
    envelope_steps: Annotated[int, typer.Option(help="Readings per device per message")] = 1,
    seed: Annotated[int, typer.Option()] = 0,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Stream a simulated fleet (with labelled anomalies) into <prefix>.readings."""
    from connectors.simulator import FleetSimulator, make_producer, run_simulation

    s = _settings()
    sim = FleetSimulator(devices, seed=seed, step_ms=s.step_ms, anomaly_count=anomalies)
    producer = make_producer(s.kafka_bootstrap)
    try:
        stats = run_simulation(
            producer,
            s.readings_topic,
            sim,
            steps=steps,
            rate_steps_per_s=1000 / s.step_ms if realtime else None,
            end_at_now=not realtime,
            malformed_every=malformed_every,
            late_every=late_every,
            envelope_steps=envelope_steps,
        )
    finally:
        producer.close()
    out = stats.to_dict()
    _print_summary("simulate", {k: v for k, v in out.items() if k != "anomalies"}, False)
    if as_json:
        print(json.dumps(out), flush=True)


@app.command()
def replay(
    csv: Annotated[Path, typer.Argument(help="CSV file (NAB or SKAB layout, or timestamp + columns)")],
    device: Annotated[str, typer.Option(help="Device id to send as")] = "replay-0",
    speed: Annotated[float | None, typer.Option(help="x real time (default: as fast as possible)")] = None,
    limit: Annotated[int | None, typer.Option(help="Rows at most")] = None,
    step_ms: Annotated[int | None, typer.Option(help="Re-space rows onto this grid")] = None,
) -> None:
    """Stream one CSV series into <prefix>.readings as one device."""
    from connectors.replay import replay as run_replay
    from connectors.simulator import make_producer

    s = _settings()
    producer = make_producer(s.kafka_bootstrap)
    try:
        stats = run_replay(producer, s.readings_topic, csv, device, speed=speed, limit=limit, step_ms=step_ms)
    finally:
        producer.close()
    _print_summary("replay", dict(vars(stats)), False)


@app.command()
def train(
    out: Annotated[
        Path | None,
        typer.Option(help="Artifact directory to write (default: models/default, bilstm-ae: models/bilstm-ae)"),
    ] = None,
    source: Annotated[str, typer.Option(help="sim (simulated fleet) or a CSV path")] = "sim",
    devices: Annotated[int, typer.Option(help="sim: devices")] = 48,
    steps: Annotated[int, typer.Option(help="sim: steps per device")] = 3000,
    model: Annotated[
        str,
        typer.Option(
            "--model",
            "--cell",
            help="lstm or gru (streaming forecasters), or bilstm-ae (a windowed, offline autoencoder scorer "
            "that the streaming worker refuses to serve)",
        ),
    ] = "lstm",
    hidden: Annotated[int, typer.Option()] = 64,
    layers: Annotated[int, typer.Option()] = 2,
    window: Annotated[int, typer.Option(help="bilstm-ae: rows per window")] = 60,
    epochs: Annotated[int, typer.Option()] = 30,
    max_batches: Annotated[int | None, typer.Option(help="Cap on batches per epoch")] = None,
    seed: Annotated[int, typer.Option()] = 0,
    version: Annotated[str | None, typer.Option(help="Version label (default: time-based)")] = None,
) -> None:
    """Train a model and write a versioned artifact (weights + metadata)."""
    from pipeline.datasets import csv_dataset, simulator_dataset

    if model not in ("lstm", "gru", "bilstm-ae"):
        raise typer.BadParameter("--model must be lstm, gru or bilstm-ae")
    data = simulator_dataset(devices, steps, seed=seed + 1) if source == "sim" else csv_dataset(Path(source))
    label = version or time.strftime("v%Y%m%d-%H%M%S")
    metrics: dict[str, float]
    if model == "bilstm-ae":
        from models.autoencoder import AutoencoderTrainConfig, save_autoencoder, train_autoencoder

        out = out or Path("models/bilstm-ae")  # never over the worker's default forecaster
        ae_config = AutoencoderTrainConfig(
            window=window, hidden=hidden, layers=layers, max_epochs=epochs, seed=seed, max_batches_per_epoch=max_batches
        )
        ae = train_autoencoder(data.series, data.features, ae_config, mask=data.mask)
        save_autoencoder(ae, out, version=label, data_description=data.description)
        metrics = ae.metrics
    else:
        from models.training import TrainConfig, save_trained
        from models.training import train as fit

        out = out or Path("models/default")
        config = TrainConfig(
            cell="gru" if model == "gru" else "lstm",
            hidden=hidden,
            layers=layers,
            max_epochs=epochs,
            seed=seed,
            max_batches_per_epoch=max_batches,
        )
        result = fit(data.series, data.features, config, mask=data.mask)
        save_trained(result, out, version=label, data_description=data.description)
        metrics = result.metrics
    _print_summary(f"trained {label} -> {out}", dict(metrics), False)


@app.command()
def demo(
    duration: Annotated[float, typer.Option(help="Seconds of simulated traffic")] = 60.0,
    devices: Annotated[int, typer.Option(help="Fleet size")] = 100,
    anomalies: Annotated[int, typer.Option(help="Anomalies to inject")] = 12,
    malformed_every: Annotated[int, typer.Option(help="One malformed message per N valid")] = 200,
    step_ms: Annotated[int, typer.Option(help="Model step for the demo (overrides IOTAD_STEP_MS)")] = 500,
    out: Annotated[Path, typer.Option(help="Where the plot goes")] = Path("out"),
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON summary on the last line")] = False,
) -> None:
    """Run the whole pipeline on the embedded stack with a simulated fleet; print a summary."""
    from pipeline.demo import DemoConfig, run_demo

    settings = _settings(step_ms=step_ms)
    logging.basicConfig(level=logging.WARNING)
    summary = run_demo(settings, DemoConfig(duration, devices, anomalies, malformed_every, out_dir=out))
    _print_summary("iotad demo", summary, as_json)


@app.command()
def evaluate(
    dataset: Annotated[str, typer.Argument(help="nab or skab")],
    data: Annotated[Path | None, typer.Option(help="Dataset root (default: ../shared/datasets/<dataset>)")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON summary on the last line")] = False,
    out: Annotated[Path, typer.Option(help="Folder for the per-series PNGs, the model and a detailed JSON")] = Path(
        "out/evaluate"
    ),
    plots: Annotated[bool, typer.Option(help="Write a PNG per series")] = True,
    export_nab_results: Annotated[
        Path | None, typer.Option(help="Write NAB results (DIR/<detector>/<category>/<detector>_<file>.csv)")
    ] = None,
    export_skab_results: Annotated[
        Path | None, typer.Option(help="Write SKAB predictions (DIR/<folder>/<n>.csv: datetime,anomaly,changepoint)")
    ] = None,
    scorer: Annotated[
        str,
        typer.Option(
            help="streaming (the live detector's code path) or bilstm-ae (skab only: a windowed, offline "
            "BiLSTM autoencoder scorer)"
        ),
    ] = "streaming",
    cell: Annotated[str, typer.Option(help="The streaming scorer's forecaster: lstm or gru")] = "lstm",
    seeds: Annotated[
        int,
        typer.Option(
            min=1,
            help="Repeat the streaming run with forecaster seeds 0..N-1 and report each figure's median and "
            "range (seed_spread); the headline figures stay seed 0's",
        ),
    ] = 1,
) -> None:
    """Score the detector on a public labelled benchmark (NAB or SKAB) through the streaming scoring code,
    or SKAB with the windowed autoencoder (--scorer bilstm-ae)."""
    from bench.evaluate import CELLS, DEFAULT_NAB, DEFAULT_SKAB, evaluate_streaming, summary_table

    name = dataset.lower()
    if name not in ("nab", "skab"):
        raise typer.BadParameter("dataset must be nab or skab")
    if scorer not in ("streaming", "bilstm-ae"):
        raise typer.BadParameter("scorer must be streaming or bilstm-ae")
    if scorer == "bilstm-ae" and name != "skab":
        raise typer.BadParameter("--scorer bilstm-ae is evaluated on skab only")
    if name == "nab" and export_skab_results is not None:
        raise typer.BadParameter("--export-skab-results is for skab")
    if name == "skab" and export_nab_results is not None:
        raise typer.BadParameter("--export-nab-results is for nab")
    if cell not in CELLS:
        raise typer.BadParameter(f"--cell must be one of {', '.join(CELLS)}")
    if scorer == "bilstm-ae" and (cell != "lstm" or seeds != 1):
        raise typer.BadParameter("--cell and --seeds are options of the streaming scorer")
    log = console.print
    if scorer == "bilstm-ae":
        from bench.evaluate_windowed import run_skab_windowed

        summary = run_skab_windowed(data or DEFAULT_SKAB, out=out, export=export_skab_results, plots=plots, log=log)
    else:
        summary = evaluate_streaming(
            name,
            data or (DEFAULT_NAB if name == "nab" else DEFAULT_SKAB),
            cell=cell,
            seeds=seeds,
            out=out,
            export=export_nab_results if name == "nab" else export_skab_results,
            plots=plots,
            log=log,
        )
    console.print(summary_table(summary))
    if as_json:
        print(json.dumps(summary), flush=True)


@bench_app.command("throughput")
def bench_throughput(
    devices: Annotated[str, typer.Option(help="Comma-separated fleet sizes")] = "100,10000",
    readings: Annotated[int, typer.Option(help="Readings per run")] = 60000,
    envelope: Annotated[int, typer.Option(help="Readings per message (1 = single readings)")] = 1,
    step_ms: Annotated[int, typer.Option(help="Resampling step; the latency fleet sends one reading a step")] = 1000,
    repeats: Annotated[
        int, typer.Option(min=1, help="Faust/lean pairs per fleet size, order alternating (median rates and ratio)")
    ] = 1,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """End-to-end readings/s through Faust vs a lean aiokafka loop on the same broker (see bench/)."""
    from bench.throughput import main as run

    run([int(d) for d in devices.split(",")], readings, envelope, as_json, step_ms, repeats)


@bench_app.command("bad-input")
def bench_bad_input(
    devices: Annotated[int, typer.Option(help="Fleet size")] = 200,
    steps: Annotated[int, typer.Option(help="Steps per device (valid readings = devices x steps)")] = 500,
    malformed: Annotated[int, typer.Option(help="Bad messages mixed in (every kind)")] = 10_000,
    oversized: Annotated[int, typer.Option(help="Of which just over 1 MiB (each crosses Kafka twice)")] = 8,
    repeats: Annotated[int, typer.Option(help="Clean/mixed run pairs (median rates)")] = 2,
    torch_threads: Annotated[int, typer.Option(help="IOTAD_TORCH_THREADS of the workers")] = 1,
    seed: Annotated[int, typer.Option()] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON summary on the last line")] = False,
) -> None:
    """Clean vs mixed-with-bad-input runs on the local stack: DLQ share, crashes, readings/s (bench/bad_input.py)."""
    from bench.bad_input import BadInputConfig
    from bench.bad_input import main as run

    logging.basicConfig(level=logging.WARNING)
    cfg = BadInputConfig(devices, steps, malformed, oversized, max(1, repeats), seed, torch_threads=torch_threads)
    summary = run(cfg, as_json=as_json)
    raise typer.Exit(0 if summary["ok"] else 1)


@bench_app.command("faults")
def bench_faults(
    outage_s: Annotated[float, typer.Option(help="Seconds InfluxDB stays down in influx_outage")] = 60.0,
    scenarios: Annotated[
        str, typer.Option(help="Comma-separated: kill,rebalance,influx_outage,model_swap,alert_receiver_down")
    ] = "kill,rebalance,influx_outage,model_swap,alert_receiver_down",
    receiver_down_s: Annotated[float, typer.Option(help="Seconds the alert receiver is down")] = 60.0,
    devices: Annotated[int, typer.Option(help="Simulated fleet size")] = 24,
    rate: Annotated[float, typer.Option(help="Fleet steps per second (readings/s = devices x rate)")] = 4.0,
    stream_s: Annotated[float, typer.Option(help="Load duration of kill, rebalance and model_swap")] = 40.0,
    seed: Annotated[int, typer.Option(help="Seeds the fleet and the kill times")] = 7,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON summary on the last line")] = False,
) -> None:
    """Fault injection on fresh local stacks under load: lost/duplicated/state mismatch/recovery (bench/faults.py)."""
    from bench.faults import FaultConfig
    from bench.faults import main as run

    logging.basicConfig(level=logging.WARNING)
    cfg = FaultConfig(
        devices=devices,
        steps_per_s=rate,
        stream_s=stream_s,
        outage_s=outage_s,
        receiver_down_s=receiver_down_s,
        seed=seed,
    )
    names = [n.strip() for n in scenarios.split(",") if n.strip()]
    raise typer.Exit(run(cfg, names, as_json=as_json, base=_settings()))


@app.command()
def settings_doc(
    out: Annotated[Path | None, typer.Option(help="Write the table to this file")] = None,
) -> None:
    """Print every setting with its environment variable and default (Markdown)."""
    from pipeline.settings_files import secret_fields

    secrets = set(secret_fields(Settings))
    rows = ["| variable | default | meaning |", "|---|---|---|"]
    for name, field in Settings.model_fields.items():
        default = "" if name in secrets else field.default  # a secret's default is never printed
        meaning = field.description or ""
        if name in secrets:
            meaning += f"; or a file: `IOTAD_{name.upper()}_FILE`"
        rows.append(f"| `IOTAD_{name.upper()}` | `{default}` | {meaning} |")
    rows.append("\nAny setting can be read from a file instead: `IOTAD_<NAME>_FILE=/path` (e.g. a mounted secret).")
    text = "\n".join(rows) + "\n"
    if out:
        out.write_text(text)
    else:
        typer.echo(text)


@app.command()
def retrain(
    loop: Annotated[bool, typer.Option("--loop/--once", help="Run once and exit (default), or keep running")] = False,
    interval: Annotated[float | None, typer.Option(help="--loop: seconds between runs (default from settings)")] = None,
    max_runs: Annotated[int | None, typer.Option(help="--loop: stop after this many runs")] = None,
    notify: Annotated[bool, typer.Option(help="Publish model-updated on <prefix>.control when promoting")] = True,
    as_json: Annotated[bool, typer.Option("--json", help="Print each run's report as one JSON line")] = False,
) -> None:
    """Retrain on recent InfluxDB history; promote the candidate if it beats the champion (pipeline/retrain.py)."""
    from pipeline.retrain import exit_code, run_loop, run_once

    settings = _settings()
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s %(message)s")

    def show(report: dict[str, object]) -> None:
        keys = ("decision", "reason", "version", "report", "promoted", "notified", "seconds")
        _print_summary("iotad retrain", {k: report.get(k) for k in keys}, False)
        if as_json:
            print(json.dumps(report, sort_keys=True, default=str), flush=True)

    if not loop:
        report = run_once(settings, notify=notify)
        show(report)
        raise typer.Exit(exit_code(report))
    stop = {"now": False}
    signal.signal(signal.SIGTERM, lambda *_: stop.update(now=True))
    with contextlib.suppress(KeyboardInterrupt):
        run_loop(
            settings,
            interval_s=interval if interval is not None else settings.retrain_interval_s,
            max_runs=max_runs,
            should_stop=lambda: stop["now"],
            on_report=show,
        )


def _registry(settings: Settings) -> ModelRegistry:
    from models.registry import open_registry

    return open_registry(settings.registry)


_P = ParamSpec("_P")
_T = TypeVar("_T")


def _registry_call(fn: Callable[_P, _T], *args: _P.args, **kwargs: _P.kwargs) -> _T:
    """Call a registry method; its expected errors become a message and exit code 1."""
    from models.artifact import ArtifactError
    from models.registry import RegistryError

    try:
        return fn(*args, **kwargs)
    except (RegistryError, ArtifactError, OSError) as exc:
        console.print(f"[red]error:[/] {exc}")
        raise typer.Exit(1) from exc


def _announce(settings: Settings, registry: ModelRegistry, version: str, previous: str | None) -> None:
    """Publish model-updated for a champion changed by hand; exit 2 if it cannot be sent."""
    from pipeline import control

    local = registry.local_path(version)
    message = control.model_updated(
        version,
        registry.url,
        sha256=registry.info(version).sha256,
        previous=previous,
        path=None if local is None else str(local),
    )
    try:
        control.publish(settings.kafka_bootstrap, settings.control_topic, message)
    except Exception as exc:
        console.print(
            f"[yellow]the registry is updated, but {control.MODEL_UPDATED} could not be published on "
            f"{settings.control_topic} ({exc}); workers see it when they next read the registry[/]"
        )
        raise typer.Exit(2) from exc
    console.print(f"published {control.MODEL_UPDATED} {version} on {settings.control_topic}")


def _fmt_metric(value: object) -> str:
    return f"{value:.4g}" if isinstance(value, float) else ("" if value is None else str(value))


@model_app.command("list")
def model_list(as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Registered versions: stage, registration time, weights hash, validation metrics."""
    settings = _settings()
    registry = _registry(settings)
    infos = _registry_call(registry.list)
    if as_json:
        print(json.dumps([i.to_dict() for i in infos]), flush=True)
        return
    table = Table(title=f"model registry {registry.url}")
    table.add_column("version", overflow="fold")
    for col in ("stage", "registered", "sha256"):
        table.add_column(col, no_wrap=True)
    for col in ("val_mse", "test_mse", "eval_mse"):
        table.add_column(col, justify="right")
    for i in infos:
        style = "bold green" if i.stage == "champion" else ("dim" if i.stage == "retired" else None)
        table.add_row(
            i.version,
            i.stage,
            i.registered_at[:19].replace("T", " "),
            i.sha256[:12],
            *(_fmt_metric(i.metrics.get(k)) for k in ("val_mse", "test_mse", "eval_mse")),
            style=style,
        )
    Console().print(table)
    orphans = _registry_call(registry.orphans)
    if orphans:
        console.print(f"[yellow]unreferenced version directories (an interrupted register):[/] {', '.join(orphans)}")


@model_app.command("show")
def model_show(version: Annotated[str, typer.Argument(help="Version label")]) -> None:
    """One version as JSON: its registry entry and its artifact metadata."""
    registry = _registry(_settings())
    print(json.dumps(_registry_call(registry.show, version), indent=2, sort_keys=True, default=str), flush=True)


@model_app.command("register")
def model_register(
    directory: Annotated[Path, typer.Argument(help="Artifact directory (model.safetensors + model.json)")],
) -> None:
    """Verify an artifact and copy it into the registry as a candidate; prints its version."""
    registry = _registry(_settings())
    version = _registry_call(registry.register, directory)
    console.print(f"registered {version} in {registry.url} (stage candidate)")
    print(version, flush=True)


@model_app.command("promote")
def model_promote(
    version: Annotated[str, typer.Argument(help="Version label")],
    notify: Annotated[bool, typer.Option(help="Publish model-updated on <prefix>.control")] = True,
    reason: Annotated[str, typer.Option(help="Recorded in the registry history")] = "manual",
) -> None:
    """Make VERSION the champion (the previous champion is retired)."""
    settings = _settings()
    registry = _registry(settings)
    previous = _registry_call(registry.promote, version, reason=reason)
    console.print(f"champion: {version} (was {previous})")
    if notify and previous != version:
        _announce(settings, registry, version, previous)


@model_app.command("rollback")
def model_rollback(
    notify: Annotated[bool, typer.Option(help="Publish model-updated on <prefix>.control")] = True,
    reason: Annotated[str, typer.Option(help="Recorded in the registry history")] = "manual",
) -> None:
    """Retire the champion and bring the previous one back."""
    settings = _settings()
    registry = _registry(settings)
    current = _registry_call(registry.champion)
    restored = _registry_call(registry.rollback, reason=reason)
    console.print(f"champion: {restored} (rolled back from {current})")
    if notify:
        _announce(settings, registry, restored, current)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
