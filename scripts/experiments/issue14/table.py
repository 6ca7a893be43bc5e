"""Issue-14 figures from pairs of reports (@ = the training seed).

python scripts/experiments/issue14/table.py @-base,@-c1 3 4
"""

import json
import sys

for seed in sys.argv[2:]:
    for arm in sys.argv[1].split(","):
        with open(f"scripts/experiments/issue14/{arm.replace('@', seed)}.json") as fh:
            r = json.load(fh)
        u = r["unseen_kind"]["total"]
        cells = [f"valve1 F1 {u['f1']:.3f} FAR {u['far']:.1%} MAR {u['mar']:.1%}"]
        for name, block in r["injected"].items():
            o = block["overall"]
            none = block["kinds"]["none"]
            cells.append(
                f"{name.split()[0]}: F1 {o['f1']:.3f} FAR {o['far']:.1%} MAR {o['mar']:.1%}"
                f" (bg alone FAR {none['far']:.1%})"
            )
        print(f"seed {seed} {arm:4}: " + " | ".join(cells))
