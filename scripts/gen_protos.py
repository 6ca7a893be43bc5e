"""Generates the Python stubs (and .pyi) for protos/autoglm/v1 and protos/sparkplug from the
.proto sources.

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
PROTO_DIRS = (ROOT / "protos" / "autoglm" / "v1", ROOT / "protos" / "sparkplug")
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi")


def _generate(out_root: Path) -> list[Path]:
    """Runs protoc with the repository root as include path, so imports read `protos.autoglm.v1`;
    the generated files, relative to `out_root`."""
    import grpc_tools
    from grpc_tools import protoc  # dev dependency, imported only here

    well_known = Path(grpc_tools.__file__).parent / "_proto"
    sources = sorted(p.relative_to(ROOT).as_posix() for d in PROTO_DIRS for p in d.glob("*.proto"))
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
    return sorted(
        (out_root / d.relative_to(ROOT) / p.name).relative_to(out_root)
        for d in PROTO_DIRS
        for p in (out_root / d.relative_to(ROOT)).iterdir()
        if p.name.endswith(GENERATED_SUFFIXES)
    )


def _committed() -> list[Path]:
    return sorted(
        p.relative_to(ROOT)
        for d in PROTO_DIRS
        for p in d.iterdir()
        if p.name.endswith(GENERATED_SUFFIXES)
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail on drift, write nothing")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        generated = _generate(out)
        committed = _committed()
        if args.check:
            drift = {str(p) for p in set(generated) ^ set(committed)}
            drift |= {
                str(p)
                for p in generated
                if (ROOT / p).exists() and not filecmp.cmp(out / p, ROOT / p, False)
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
            (ROOT / stale).unlink()
        for path in generated:
            shutil.copy2(out / path, ROOT / path)
        print(f"wrote {len(generated)} files under protos/")
        return 0


if __name__ == "__main__":
    sys.exit(main())
