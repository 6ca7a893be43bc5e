"""Start-up of the operator CLI against its floor: `autoglm --help` and `autoglm device
list --help` next to `python -c "import grpc, yaml"` (what any gRPC CLI must load), in
alternating rounds in one run, wall and CPU seconds (children's user + system).

    python tests/benchmarks/bench_cli_startup.py [--rounds 15]

Prints one line per command (median wall, median CPU, ratio to the baseline) and a JSON
summary. The goal of issue 15: at most 2x the baseline.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

BIN = Path(sys.executable).parent
COMMANDS = {
    "baseline: python -c 'import grpc, yaml'": [sys.executable, "-c", "import grpc, yaml"],
    "autoglm --help": [str(BIN / "autoglm"), "--help"],
    "autoglm device list --help": [str(BIN / "autoglm"), "device", "list", "--help"],
}


def timed(argv: list[str]) -> tuple[float, float]:
    before = os.times()
    started = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - started
    after = os.times()
    cpu = (after.children_user - before.children_user) + (
        after.children_system - before.children_system
    )
    return wall, cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in COMMANDS}
    for argv in COMMANDS.values():  # warm the file cache once
        timed(argv)
    for _ in range(args.rounds):
        for name, argv in COMMANDS.items():
            samples[name].append(timed(argv))
    base = next(iter(COMMANDS))
    base_wall = statistics.median(w for w, _ in samples[base])
    base_cpu = statistics.median(c for _, c in samples[base])
    summary = {}
    for name, runs in samples.items():
        wall = statistics.median(w for w, _ in runs)
        cpu = statistics.median(c for _, c in runs)
        summary[name] = {
            "wall_s": round(wall, 3),
            "cpu_s": round(cpu, 3),
            "wall_ratio": round(wall / base_wall, 2),
            "cpu_ratio": round(cpu / base_cpu, 2) if base_cpu else None,
        }
        print(
            f"{name:45s} wall {wall:.3f} s ({wall / base_wall:.2f}x)  "
            f"cpu {cpu:.3f} s ({cpu / base_cpu if base_cpu else float('nan'):.2f}x)"
        )
    print(json.dumps({"rounds": args.rounds, "results": summary}, indent=1))


if __name__ == "__main__":
    main()
