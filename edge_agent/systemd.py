"""systemd's notify protocol (`Type=notify`, `WatchdogSec=`) in a few lines of socket code.

`READY=1` once the data path runs; then `WATCHDOG=1` every half watchdog interval for as long
as the data path's threads are alive, so systemd restarts an agent whose pipeline died or
hung even though the process lives on. Outside systemd (no `NOTIFY_SOCKET`) nothing is sent.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Callable, Mapping

from edge_agent.waits import event_or_timeout

log = logging.getLogger(__name__)


class Notifier:
    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        address = env.get("NOTIFY_SOCKET", "")
        if address.startswith("@"):  # an abstract socket
            address = "\0" + address[1:]
        self.address = address
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        mine = not pid or pid == str(os.getpid())
        self.watchdog_s = int(usec) / 1e6 if usec.isdigit() and mine else 0.0

    def notify(self, state: str) -> bool:
        """Sends `state` (e.g. "READY=1"); False outside systemd or when it cannot."""
        if not self.address:
            return False
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.connect(self.address)
                sock.sendall(state.encode())
            return True
        except OSError as exc:
            log.warning("systemd notify (%s) failed: %s", state.split("=")[0], exc)
            return False

    async def watchdog(self, alive: Callable[[], bool], stop: asyncio.Event) -> None:
        """Pings the watchdog every half interval while `alive()`; stops pinging (systemd
        then restarts the agent) when it is not."""
        if not self.address or self.watchdog_s <= 0:
            return
        while not stop.is_set():
            if alive():
                self.notify("WATCHDOG=1")
            else:
                log.error("the data path is not running: the systemd watchdog is not fed")
            await event_or_timeout(stop, self.watchdog_s / 2)
