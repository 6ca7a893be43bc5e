"""A `select()` that works for every descriptor number, given to the libraries that wait
with `select.select()`.

paho-mqtt 2.2 (its network loop) and pymodbus 3 (the TCP client's reads) wait with
`select.select()`, which raises ValueError for a descriptor at or above FD_SETSIZE (1024
on Linux). paho takes that error for a lost connection and reconnects for ever, so a
process holding more than about 1,000 files and sockets (many assets, OPC UA and Modbus
sessions, open logs and databases) never connects to its broker again, and nothing says
why. `poll_select` keeps `select.select`'s contract over `poll()`, which has no such
limit; `install` hands it to a library module in place of the `select` module it imported.
"""

from __future__ import annotations

import logging
import select
import types
from collections.abc import Sequence
from typing import Any

log = logging.getLogger(__name__)

_READ = select.POLLIN | select.POLLPRI | select.POLLHUP | select.POLLERR | select.POLLNVAL
_WRITE = select.POLLOUT | select.POLLHUP | select.POLLERR | select.POLLNVAL


def _descriptor(item: Any) -> int:
    """`item`'s descriptor as select() takes it: an int or an object with fileno()."""
    if isinstance(item, int):
        fd = item
    elif callable(getattr(item, "fileno", None)):
        fd = item.fileno()
    else:
        raise TypeError(f"{type(item).__name__} has no fileno(), as select() requires")
    if not isinstance(fd, int):
        raise TypeError(f"fileno() returned {type(fd).__name__}, not an int")
    if fd < 0:  # a closed socket: select() raises this too, and paho expects it
        raise ValueError(f"file descriptor cannot be a negative integer ({fd})")
    return fd


def poll_select(
    rlist: Sequence[Any], wlist: Sequence[Any], xlist: Sequence[Any], timeout: float | None = None
) -> tuple[list[Any], list[Any], list[Any]]:
    """`select.select(rlist, wlist, xlist, timeout)` over poll(): the same three lists of
    ready objects (readable also on hang-up or error, as select reports them), any
    descriptor number."""
    if timeout is not None and timeout < 0:
        raise ValueError("timeout must be non-negative")
    masks: dict[int, int] = {}
    wanted = (
        (rlist, select.POLLIN | select.POLLPRI),
        (wlist, select.POLLOUT),
        (xlist, select.POLLPRI),
    )
    for items, mask in wanted:
        for item in items:
            fd = _descriptor(item)
            masks[fd] = masks.get(fd, 0) | mask
    poller = select.poll()
    for fd, mask in masks.items():
        poller.register(fd, mask)
    ready = dict(poller.poll(None if timeout is None else timeout * 1000.0))
    if not ready:
        return [], [], []
    return (
        [item for item in rlist if ready.get(_descriptor(item), 0) & _READ],
        [item for item in wlist if ready.get(_descriptor(item), 0) & _WRITE],
        [item for item in xlist if ready.get(_descriptor(item), 0) & select.POLLPRI],
    )


def _wide_select_module() -> types.ModuleType:
    """A stand-in for the `select` module: everything of the real one, `select` replaced."""
    module = types.ModuleType("select", "select with poll_select for select()")
    module.__dict__.update(
        {name: value for name, value in vars(select).items() if not name.startswith("__")}
    )
    module.select = poll_select  # type: ignore[attr-defined]
    return module


_WIDE = _wide_select_module()


def install(library: types.ModuleType) -> bool:
    """Makes `library` (a module that did `import select`) wait with `poll_select`; False,
    with a warning, where the module no longer holds the `select` module (a library
    version whose network code changed: see the pinned versions)."""
    held = getattr(library, "select", None)
    if held is _WIDE:
        return True
    if held is not select:
        log.warning(
            "%s does not wait with select.select any more; descriptors above 1023 may not "
            "work with it (check the library version against constraints.txt)",
            library.__name__,
        )
        return False
    library.select = _WIDE  # type: ignore[attr-defined]
    return True
