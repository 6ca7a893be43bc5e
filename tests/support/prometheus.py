"""A real Prometheus for tests (Debian's `prometheus`), on a free port, scraping the given
targets every second; `query` asks its HTTP API."""

from __future__ import annotations

import json
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from tests.support.service_process import ServiceProcess


class Prometheus(ServiceProcess):
    def __init__(self, directory: Path, targets: dict[str, str]) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        jobs = [
            {"job_name": job, "static_configs": [{"targets": [address]}]}
            for job, address in targets.items()
        ]
        config = {"global": {"scrape_interval": "1s", "scrape_timeout": "900ms"},
                  "scrape_configs": jobs}  # fmt: skip
        (directory / "prometheus.yml").write_text(json.dumps(config))  # JSON is YAML
        super().__init__(
            ("prometheus",),
            "prometheus",
            directory,
            lambda port: [
                f"--config.file={directory / 'prometheus.yml'}",
                f"--storage.tsdb.path={directory / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
        )

    def query(self, expr: str) -> list[tuple[dict[str, str], float]]:
        """An instant query: (labels, value) per series."""
        url = f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        with urllib.request.urlopen(url, timeout=10) as response:
            doc: dict[str, Any] = json.loads(response.read())
        return [(r["metric"], float(r["value"][1])) for r in doc["data"]["result"]]

    def value(self, expr: str) -> float | None:
        """The value of a query that gives one series (None while it gives none)."""
        result = self.query(expr)
        return result[0][1] if len(result) == 1 else None
