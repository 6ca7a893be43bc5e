"""The heartbeat benchmark's lines of text: a steady-state scenario, a restart storm, the
plane's profile (`bench_heartbeats.py` writes them; the figures are in its JSON too)."""

from __future__ import annotations

from typing import Any

from cloud.service.metrics import SETUP_PHASES


def scenario_lines(agents: int, r: dict[str, Any]) -> str:
    """A steady-state scenario: the plane's profile first, when it was taken."""
    lines = []
    if "plane_profile" in r:
        shares = r["plane_profile"]
        lines.append(f"plane profile: a thread held the GIL {shares['gil_busy']:.0%} of the window")
        for part in ("threads", "self", "ours"):
            lines.append(
                f"plane profile, {part} (share of GIL-held samples): "
                + "; ".join(f"{n} {v:.0%}" for n, v in shares[part])
            )
    lines.append(
        f"M={agents:5d}: connected {r['connected']}/{agents} in {r['connect_s']:.1f}s; "
        f"{heartbeat_line(r)}; {r['ratio_vs_ping']:.2f}x raw ping acked; "
        f"reconnects in the window {r['reconnects_in_window']}; failed attempts while "
        f"connecting {r['connect_failed_attempts']} "
        f"({r['connect_attempt_errors']}), last errors of those not in "
        f"{r['connect_last_errors']}"
    )
    return "\n".join(lines)


def storm_line(r: dict[str, object]) -> str:
    line = (
        f"storm M={r['agents']} ({r['policy']} policy): {r['connected_before_kill']} connected "
        f"after {r['first_connect_s']:.1f}s; plane killed, listening again after "
        f"{r['listening_after_s']:.1f}s; {r['reconnected']}/{r['agents']} back, all after "
        f"{r['all_back_after_s']:.1f}s (p50 {r['back_p50_s']:.1f}s, p99 {r['back_p99_s']:.1f}s); "
        f"failed attempts {r['failed_attempts']} (busy refusals {r['busy_refusals']}); "
        f"plane CPU {r['storm_server_cpu_s']:.1f}s, "
        f"agents CPU {_seconds(r['storm_agents_cpu_s'])} (per agent process), "
        f"plane peak RSS "
        f"{r['server_peak_rss_mib']:.0f} MiB; last errors {r['last_errors']}; "
        f"back per second after the kill {r['back_per_second']}"
    )
    if "p99_ms" in r:
        line += f"; then {heartbeat_line(r)}"
    return line


def heartbeat_line(r: dict[str, Any]) -> str:
    line = (
        f"offered {r['offered_per_s']:.0f}/s, sent {r['sent_per_s']:.0f}/s, "
        f"acked {r['acked_per_s']:.0f}/s, "
        f"p50 {r['p50_ms']:.1f} ms, p99 {r['p99_ms']:.1f} ms; CPU cores busy: plane "
        f"{r['server_cpu_share']:.2f}, agent processes {_shares(r['client_cpu_share'])}; "
        f"agent loops late by (p50/p99) {_lags(r['agents_loop_lag_ms'])}"
    )
    if "plane_loop_lag_s" in r:
        lag = r["plane_loop_lag_s"]
        line += f"; plane loop late by (p50/p99, bucket bounds) {lag['p50']:g}/{lag['p99']:g} s"
    phases = [p for p in SETUP_PHASES if f"setup_{p}_s" in r]
    if phases:
        line += "; session setups (p50/p99, bucket bounds) " + ", ".join(
            f"{p} {r[f'setup_{p}_s']['p50']:g}/{r[f'setup_{p}_s']['p99']:g} s" for p in phases
        )
    if "plane_main_threads" in r:
        threads = [*r["plane_main_threads"], *r["agents_main_threads"]]
        line += (
            f"; event-loop threads waiting for a CPU (plane {len(r['plane_main_threads'])}"
            "+agents, share of the window / "
            "mean per wake) "
            + "+".join(f"{t['waited_share']:.2f}/{t['wait_per_slice_ms']:.1f} ms" for t in threads)
            + f", load average {r['load_average_1m']:.1f}; agent processes' open files "
            + "+".join(str(n) for n in r["agents_open_fds"])
            + ", threads "
            + "+".join(str(n) for n in r["agents_threads"])
        )
    if "probe_p99_ms" in r:
        line += (
            f"; probes ({r['probe_connected']} connected, {r['probe_acked']} acked): "
            f"p50 {r['probe_p50_ms']:.1f} ms, p99 {r['probe_p99_ms']:.1f} ms, "
            f"max {r['probe_max_ms']:.1f} ms, "
            f"their loop late by {_lags([r['probe_loop_lag_ms']])}, "
            f"waiting for a CPU {r['probe_main_thread']['waited_share']:.2f}/"
            f"{r['probe_main_thread']['wait_per_slice_ms']:.1f} ms"
        )
    return line


def _lags(values: object) -> str:
    return "+".join(f"{a:.0f}/{b:.0f} ms" for a, b in values)  # type: ignore[attr-defined]


def _seconds(values: object) -> str:
    return "+".join(f"{v:.1f}s" for v in values)  # type: ignore[attr-defined]


def _shares(values: object) -> str:
    return "+".join(f"{v:.2f}" for v in values)  # type: ignore[attr-defined]
