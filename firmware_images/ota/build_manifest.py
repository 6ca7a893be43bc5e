"""Builds a signed OTA image manifest for one device profile.

    python firmware_images/ota/build_manifest.py --profile jetson-orin-nx \\
        --image registry.example/autoglm-edge@sha256:<64 hex> --version 0.1.0 \\
        --signing-key signing.key --out ota/
    python firmware_images/ota/build_manifest.py --base-image jetson-orin-nx

Writes `ota-manifest.json` and `ota-manifest.sig` (Ed25519 over the manifest's bytes, the
same key and scheme as model bundles). The manifest (format `autoglm-ota/1`) names the
profile and its JetPack/L4T, the agent version, the agent image by digest (a device pulls
exactly that), and the host files the image installs (systemd unit) with their sha256.
`--base-image PROFILE` prints the profile's pinned base image for the Dockerfile build.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from cloud.model.bundle_writer import load_signing_key  # noqa: E402
from cloud.profiles import DEFAULT_DIR, load_profiles  # noqa: E402
from edge_agent.errors import AutoglmError, InvalidInput, report  # noqa: E402

FORMAT = "autoglm-ota/1"
DIGEST_REF = re.compile(r"^[a-z0-9.-]+(/[a-z0-9._-]+)+@sha256:[0-9a-f]{64}$")
HOST_FILES = {
    "etc/systemd/system/autoglm-edge.service": ROOT / "firmware_images/agent/autoglm-edge.service",
}


def build(profile_name: str, image: str, version: str, profiles_dir: Path) -> dict[str, object]:
    profiles = load_profiles(profiles_dir)
    if profile_name not in profiles:
        known = ", ".join(sorted(profiles))
        raise InvalidInput(f"--profile {profile_name!r}: not a device profile (known: {known})")
    if not DIGEST_REF.match(image):
        raise InvalidInput(
            f"--image {image!r}: an OTA image is pinned by digest (registry/path@sha256:<64 hex>)"
        )
    if not re.match(r"^\d+\.\d+\.\d+([.-][0-9A-Za-z.-]+)?$", version):
        raise InvalidInput(f"--version {version!r} is not a version like 0.1.0")
    p = profiles[profile_name]
    return {
        "format": FORMAT,
        "profile": p.name,
        "device": p.device,
        "jetpack": p.jetpack,
        "l4t": p.l4t,
        "agent_version": version,
        "image": {"reference": image, "platform": "linux/arm64", "base": p.agent_base_image},
        "host_files": [
            {"path": path, "sha256": hashlib.sha256(src.read_bytes()).hexdigest()}
            for path, src in sorted(HOST_FILES.items())
        ],
        "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile")
    parser.add_argument("--image", help="the agent image, pinned by digest")
    parser.add_argument("--version", help="agent version")
    parser.add_argument(
        "--signing-key", type=Path, help="Ed25519 PEM; default $AUTOGLM_SIGNING_KEY"
    )
    parser.add_argument("--out", type=Path, help="directory for ota-manifest.json and .sig")
    parser.add_argument("--profiles-dir", type=Path, default=DEFAULT_DIR)
    parser.add_argument("--base-image", metavar="PROFILE", help="print its pinned base image")
    args = parser.parse_args(argv)
    try:
        if args.base_image:
            profiles = load_profiles(args.profiles_dir)
            if args.base_image not in profiles:
                raise InvalidInput(f"--base-image {args.base_image!r}: not a device profile")
            print(profiles[args.base_image].agent_base_image)
            return 0
        missing = [f for f in ("profile", "image", "version", "out") if not getattr(args, f)]
        if missing:
            raise InvalidInput(f"missing --{', --'.join(missing)}")
        manifest = build(args.profile, args.image, args.version, args.profiles_dir)
        key = load_signing_key(args.signing_key)
        body = json.dumps(manifest, indent=1, sort_keys=True).encode()
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "ota-manifest.json").write_bytes(body)
        (args.out / "ota-manifest.sig").write_bytes(key.sign(body))
        print(f"wrote {args.out / 'ota-manifest.json'} (+ .sig) for {args.profile}")
        return 0
    except AutoglmError as exc:
        return report("build_manifest", exc)


if __name__ == "__main__":
    sys.exit(main())
