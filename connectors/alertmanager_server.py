"""A managed Prometheus Alertmanager (Debian's ``prometheus-alertmanager``) on loopback, for tests and local runs.

Clustering is off (``--cluster.listen-address=``), so it opens only its web port. Ready when ``/-/ready``
answers 200 (INFRA.md §4: well under a second).
"""

from __future__ import annotations

import shutil
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from connectors.localstack import LOOPBACK, ManagedServer, ServerStartError, free_port


def webhook_config(url: str, *, group_by: list[str] | None = None, group_interval: str = "1s") -> dict[str, Any]:
    """An Alertmanager config that sends every alert (firing and resolved) to one webhook, at once."""
    return {
        "route": {
            "receiver": "hook",
            "group_by": group_by or ["incident"],
            "group_wait": "0s",
            "group_interval": group_interval,
            "repeat_interval": "1h",
        },
        "receivers": [{"name": "hook", "webhook_configs": [{"url": url, "send_resolved": True}]}],
    }


class Alertmanager(ManagedServer):
    name = "alertmanager"

    def __init__(
        self, data_dir: Path, config: dict[str, Any], *, port: int | None = None, start_timeout_s: float = 10.0
    ) -> None:
        super().__init__(data_dir, start_timeout_s=start_timeout_s)
        self.config = config
        self.port = port if port is not None else free_port()

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def _command(self) -> list[str]:
        binary = shutil.which("prometheus-alertmanager") or shutil.which("alertmanager")
        if binary is None:
            raise ServerStartError(
                "prometheus-alertmanager not found on PATH: install Debian's prometheus-alertmanager"
            )
        config_path = self.data_dir / "alertmanager.yml"
        config_path.write_text(yaml.safe_dump(self.config))
        return [
            binary,
            f"--config.file={config_path}",
            f"--storage.path={self.data_dir / 'data'}",
            f"--web.listen-address={LOOPBACK}:{self.port}",
            "--cluster.listen-address=",
        ]

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=0.5) as resp:
                return bool(resp.status == 200)
        except (urllib.error.URLError, OSError):
            return False
