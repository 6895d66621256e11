"""The ``iotad`` command line (typer)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer

from pipeline.settings import Settings

app = typer.Typer(help="iotad: streaming anomaly detection for IoT sensor fleets.", no_args_is_help=True)


def _settings() -> Settings:
    return Settings()


@app.command()
def worker(
    metrics_port: Annotated[int | None, typer.Option(help="Override IOTAD_METRICS_PORT")] = None,
) -> None:
    """Run a Faust scoring worker (consumes <prefix>.readings until stopped)."""
    import faust

    from pipeline.app import create_app

    settings = _settings()
    if metrics_port is not None:
        settings.metrics_port = metrics_port
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    comp = create_app(settings)
    comp.metrics.serve(settings.metrics_host, settings.metrics_port)
    faust.Worker(comp.app, loglevel=settings.log_level, quiet=True).execute_from_commandline()


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
