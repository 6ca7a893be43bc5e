"""A real Prometheus Alertmanager for tests (Debian's `prometheus-alertmanager`), on a free
port, without clustering, routing every alert (grouped by alertname and site) to one
webhook; and `Receiver`, a loopback HTTP endpoint that records the webhook notifications."""

from __future__ import annotations

import json
import threading
import urllib.parse
import urllib.request
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from tests.support.service_process import ServiceProcess


class Alertmanager(ServiceProcess):
    def __init__(self, directory: Path, receiver_url: str, group_wait_s: float = 0.5) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        route = {
            "receiver": "hook",
            "group_by": ["alertname", "site"],
            "group_wait": f"{round(group_wait_s * 1000)}ms",
            "group_interval": "1s",
            "repeat_interval": "1h",
        }
        hook = {"name": "hook", "webhook_configs": [{"url": receiver_url, "send_resolved": True}]}
        config = {"route": route, "receivers": [hook]}
        (directory / "alertmanager.yml").write_text(json.dumps(config))  # JSON is YAML
        super().__init__(
            ("prometheus-alertmanager", "alertmanager"),
            "prometheus-alertmanager",
            directory,
            lambda port: [
                f"--config.file={directory / 'alertmanager.yml'}",
                f"--storage.path={directory / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--cluster.listen-address=",  # no gossip: one instance, no other ports
            ],
        )

    def alerts(
        self, active: bool = True, silenced: bool = True, inhibited: bool = True
    ) -> list[dict[str, Any]]:
        """GET /api/v2/alerts: each with labels, annotations, startsAt, endsAt, fingerprint
        and status {state: active|suppressed|unprocessed, silencedBy, inhibitedBy}."""
        flags = {"active": active, "silenced": silenced, "inhibited": inhibited}
        query = urllib.parse.urlencode({k: str(v).lower() for k, v in flags.items()})
        with urllib.request.urlopen(f"{self.url}/api/v2/alerts?{query}", timeout=10) as response:
            alerts: list[dict[str, Any]] = json.loads(response.read())
        return alerts

    def add_silence(
        self, matchers: dict[str, str], minutes: float = 60, comment: str = "test"
    ) -> str:
        """Silences alerts whose labels equal all of `matchers`, from now; its silenceID."""
        now = datetime.now(UTC)
        silence = {
            "matchers": [
                {"name": k, "value": v, "isRegex": False, "isEqual": True}
                for k, v in matchers.items()
            ],
            "startsAt": now.isoformat(),
            "endsAt": (now + timedelta(minutes=minutes)).isoformat(),
            "createdBy": "tests",
            "comment": comment,
        }
        request = urllib.request.Request(
            f"{self.url}/api/v2/silences",
            data=json.dumps(silence).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            doc: dict[str, Any] = json.loads(response.read())
        return str(doc["silenceID"])


class Receiver:
    """A webhook endpoint on loopback that records each POSTed JSON body (Alertmanager's
    notifications: status, groupLabels, alerts [...]) in `notifications`."""

    def __init__(self) -> None:
        self.notifications: list[dict[str, Any]] = []
        self._changed = threading.Condition()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with receiver._changed:
                    receiver.notifications.append(json.loads(body))
                    receiver._changed.notify_all()
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)  # a free port
        self.port: int = self._server.server_address[1]
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/alertmanager"

    def wait_for(
        self, predicate: Callable[[list[dict[str, Any]]], bool], timeout_s: float = 10
    ) -> list[dict[str, Any]]:
        """All notifications so far, once `predicate` holds for them."""
        with self._changed:
            if self._changed.wait_for(lambda: predicate(self.notifications), timeout_s):
                return list(self.notifications)
            got = json.dumps(self.notifications, indent=1)
        raise AssertionError(f"no such notifications within {timeout_s} s; got:\n{got}")

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
