"""Generates the Python stubs (and .pyi) for protos/autoglm/v1 from the .proto sources.

Run from anywhere: `python scripts/gen_protos.py` regenerates in place;
`python scripts/gen_protos.py --check` regenerates into a temporary folder and exits 1
when the committed stubs differ (drift).
"""

from __future__ import annotations

import argparse
import filecmp
import os
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "protos" / "autoglm" / "v1"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi")


def _generate(out_root: Path) -> list[Path]:
    """Runs protoc with the repository root as include path, so imports read `protos.autoglm.v1`."""
    import grpc_tools
    from grpc_tools import protoc  # dev dependency, imported only here

    well_known = Path(grpc_tools.__file__).parent / "_proto"
    sources = sorted(p.relative_to(ROOT).as_posix() for p in PROTO_DIR.glob("*.proto"))
    args = [
        "protoc",
        f"-I{ROOT}",
        f"-I{well_known}",
        f"--python_out={out_root}",
        f"--grpc_python_out={out_root}",
        f"--mypy_out={out_root}",
        f"--mypy_grpc_out={out_root}",
        *sources,
    ]
    # protoc finds the mypy plugins on PATH: put this interpreter's scripts folder first.
    scripts_dir = str(Path(sys.executable).parent)
    os.environ["PATH"] = scripts_dir + os.pathsep + os.environ.get("PATH", "")
    code = protoc.main(args)
    if code != 0:
        raise SystemExit(f"protoc failed with exit code {code}")
    out_dir = out_root / "protos" / "autoglm" / "v1"
    return sorted(p for p in out_dir.iterdir() if p.name.endswith(GENERATED_SUFFIXES))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail on drift, write nothing")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        generated = _generate(Path(tmp))
        committed = sorted(p for p in PROTO_DIR.iterdir() if p.name.endswith(GENERATED_SUFFIXES))
        if args.check:
            drift = {p.name for p in generated} ^ {p.name for p in committed}
            drift |= {
                p.name
                for p in generated
                if (PROTO_DIR / p.name).exists() and not filecmp.cmp(p, PROTO_DIR / p.name, False)
            }
            if drift:
                print(
                    "generated stubs differ from protos/*.proto: "
                    + ", ".join(sorted(drift))
                    + "\nrun: python scripts/gen_protos.py",
                    file=sys.stderr,
                )
                return 1
            print(f"proto stubs up to date ({len(generated)} files)")
            return 0
        for stale in committed:
            stale.unlink()
        for path in generated:
            shutil.copy2(path, PROTO_DIR / path.name)
        print(f"wrote {len(generated)} files to {PROTO_DIR.relative_to(ROOT)}")
        return 0


if __name__ == "__main__":
    sys.exit(main())
