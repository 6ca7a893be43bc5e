"""EXP14h figures and rule from `away-S-{base,away}.json`.

python scripts/experiments/issue14/table14h.py 15 16
"""

import json
import sys

D = "scripts/experiments/issue14"
BG = {"v1": "valve1 before its fault (unseen rows)", "unl": "unlabelled files (seen as context)"}
KINDS = ["drift", "temperature-ramp", "step", "broken-correlation", "leak", "none"]


def load(seed: str, arm: str) -> dict:
    with open(f"{D}/away-{seed}-{arm}.json") as fh:
        return json.load(fh)


def d3(a: float, b: float) -> float:
    """a - b at 3 decimals (each rounded first)."""
    return round(round(a, 3) - round(b, 3), 3)


def d1(a: float, b: float) -> float:
    """a - b in points at 0.1-point precision (each rounded first)."""
    return round(round(100 * a, 1) - round(100 * b, 1), 1)


for seed in sys.argv[1:]:
    r = {arm: load(seed, arm) for arm in ("base", "away")}
    for arm, x in r.items():
        u = x["unseen_kind"]["total"]
        row = [seed, arm, f"{u['f1']:.3f}", f"{100 * u['far']:.2f}", f"{100 * u['mar']:.1f}"]
        for bg in BG.values():
            o = x["injected"][bg]["overall"]
            row += [f"{o['f1']:.3f}", f"{100 * o['far']:.2f}", f"{100 * o['mar']:.1f}"]
        print("| " + " | ".join(row) + " |")
    for k in KINDS:
        cells = []
        for bg in BG.values():
            b, a = (r[arm]["injected"][bg]["kinds"][k] for arm in ("base", "away"))
            cells.append(
                f"{100 * b['far']:.1f} -> {100 * a['far']:.1f} %"
                if k == "none"
                else f"{b['f1']:.3f} -> {a['f1']:.3f}"
            )
        print(f"  {seed} {k}: " + " / ".join(cells))
    b, a = r["base"], r["away"]
    ub, ua = b["unseen_kind"]["total"], a["unseen_kind"]["total"]
    ok = {
        1: d3(ua["f1"], ub["f1"]) >= -0.005,
        2: d1(ua["far"], ub["far"]) <= 1.0,
    }
    c3, c4 = [], []
    for bg in BG.values():
        ob, oa = b["injected"][bg]["overall"], a["injected"][bg]["overall"]
        c3.append(d3(oa["f1"], ob["f1"]) >= -0.005)
        c4.append(d1(oa["far"], ob["far"]) <= 1.0)
        print(
            f"  {seed} injected {bg[:6]}: dF1 {oa['f1'] - ob['f1']:+.4f}"
            f" dFAR {100 * (oa['far'] - ob['far']):+.2f}"
        )
    ok[3], ok[4] = all(c3), all(c4)
    ub5 = b["injected"][BG["unl"]]["overall"]["f1"]
    ua5 = a["injected"][BG["unl"]]["overall"]["f1"]
    ok[5] = d3(ua5, ub5) >= 0.010
    du, dfar = ua["f1"] - ub["f1"], 100 * (ua["far"] - ub["far"])
    print(f"  {seed} unseen valve1 dF1 {du:+.4f} dFAR {dfar:+.2f}")
    print(f"  {seed} rule: {ok} -> {'pass' if all(ok.values()) else 'FAIL'}")
