"""The ``iotad`` command line (typer). Heavy imports live inside the commands that need them."""

from __future__ import annotations

import json
import logging
import signal
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from pipeline.settings import Settings

app = typer.Typer(help="iotad: streaming anomaly detection for IoT sensor fleets.", no_args_is_help=True)
bench_app = typer.Typer(help="Benchmarks (print JSON with --json).", no_args_is_help=True)
app.add_typer(bench_app, name="bench")
console = Console(stderr=True)


def _settings(**overrides: object) -> Settings:
    s = Settings()
    for k, v in overrides.items():
        if v is not None:
            setattr(s, k, v)
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

    from pipeline.app import create_app

    settings = _settings(metrics_port=metrics_port)
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    comp = create_app(settings)
    comp.metrics.serve(settings.metrics_host, settings.metrics_port)
    faust.Worker(comp.app, loglevel=settings.log_level, quiet=True).execute_from_commandline()


@app.command()
def up(
    duration: Annotated[float | None, typer.Option(help="Stop after this many seconds (default: Ctrl-C)")] = None,
    workers: Annotated[int, typer.Option(help="Scoring worker processes")] = 1,
) -> None:
    """Start the embedded local stack (Tansu, InfluxDB, topics, workers) and keep it running."""
    from pipeline.stack import PipelineStack

    settings = _settings()
    stop = {"now": False}
    signal.signal(signal.SIGTERM, lambda *_: stop.update(now=True))
    with PipelineStack(settings, workers=workers) as stack:
        console.print(f"[bold]kafka[/] {stack.bootstrap}   [bold]influxdb[/] {stack.influx_url}")
        for w in stack.procs:
            console.print(f"worker pid {w.pid}: metrics http://127.0.0.1:{w.metrics_port}/metrics, log {w.log_path}")
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
    out: Annotated[Path, typer.Option(help="Artifact directory to write")] = Path("models/default"),
    source: Annotated[str, typer.Option(help="sim (simulated fleet) or a CSV path")] = "sim",
    devices: Annotated[int, typer.Option(help="sim: devices")] = 48,
    steps: Annotated[int, typer.Option(help="sim: steps per device")] = 3000,
    cell: Annotated[str, typer.Option(help="lstm or gru")] = "lstm",
    hidden: Annotated[int, typer.Option()] = 64,
    layers: Annotated[int, typer.Option()] = 2,
    epochs: Annotated[int, typer.Option()] = 30,
    max_batches: Annotated[int | None, typer.Option(help="Cap on batches per epoch")] = None,
    seed: Annotated[int, typer.Option()] = 0,
    version: Annotated[str | None, typer.Option(help="Version label (default: time-based)")] = None,
) -> None:
    """Train a forecaster and write a versioned artifact (weights + metadata)."""
    from models.training import TrainConfig, save_trained
    from models.training import train as fit
    from pipeline.datasets import csv_dataset, simulator_dataset

    data = simulator_dataset(devices, steps, seed=seed + 1) if source == "sim" else csv_dataset(Path(source))
    config = TrainConfig(
        cell="gru" if cell == "gru" else "lstm",
        hidden=hidden,
        layers=layers,
        max_epochs=epochs,
        seed=seed,
        max_batches_per_epoch=max_batches,
    )
    result = fit(data.series, data.features, config, mask=data.mask)
    label = version or time.strftime("v%Y%m%d-%H%M%S")
    save_trained(result, out, version=label, data_description=data.description)
    _print_summary(f"trained {label} -> {out}", dict(result.metrics), False)


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


@bench_app.command("throughput")
def bench_throughput(
    devices: Annotated[str, typer.Option(help="Comma-separated fleet sizes")] = "100,10000",
    readings: Annotated[int, typer.Option(help="Readings per run")] = 60000,
    envelope: Annotated[int, typer.Option(help="Readings per message (1 = single readings)")] = 1,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """End-to-end readings/s through Faust vs a lean aiokafka loop on the same broker (see bench/)."""
    from bench.throughput import main as run

    run([int(d) for d in devices.split(",")], readings, envelope, as_json)


@app.command()
def settings_doc(
    out: Annotated[Path | None, typer.Option(help="Write the table to this file")] = None,
) -> None:
    """Print every setting with its environment variable and default (Markdown)."""
    rows = ["| variable | default | meaning |", "|---|---|---|"]
    for name, field in Settings.model_fields.items():
        rows.append(f"| `IOTAD_{name.upper()}` | `{field.default}` | {field.description or ''} |")
    text = "\n".join(rows) + "\n"
    if out:
        out.write_text(text)
    else:
        typer.echo(text)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
