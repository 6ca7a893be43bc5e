"""Artifact download throughput: the agent's Downloader against the control plane's
DownloadArtifact, next to a raw gRPC server stream of the same file in the same run.

    python tests/benchmarks/bench_downloads.py [--size-mib 256] [--rounds 3]

Both servers run in their own process with the same mutual-TLS certificates and read the
file from disk in 1 MiB blocks; both clients run in this process. The raw baseline yields
bare bytes messages; its client drops them, or writes them to a file and fsyncs it. The
Downloader does its whole job: protobuf chunks with offsets, appended to `.part` and hashed
as they arrive, fsync, digest check, rename. Rounds
alternate baseline and system; medians are reported, with the ratio system / raw.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import grpc
from grpc import aio

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from cloud.artifacts import LocalArtifactStore
from cloud.domain import DesiredModel
from cloud.model.bundle_writer import read_own_bundle, write_signed_manifest
from cloud.state_dir import load_secrets
from cloud.store import open_store
from edge_agent.bundle import sha256_file
from edge_agent.download import CHUNK, Downloader
from edge_agent.enroll import channel_options
from edge_agent.identity import DeviceIdentity
from edge_agent.retry import Backoff
from tests.benchmarks.fleet import (
    PlaneProcess,
    enroll_fleet,
    serve_raw_until_sigterm,
    spawn,
    start_plane_process,
    stop,
)
from tests.support.bundles import make_version, train_small

READ = "/bench.Blob/Read"


# ---- the raw baseline: a bare aio server streaming the file as bytes messages ----
async def _blob_server(state: Path, ports_file: Path, blob: Path) -> None:
    def read(request: bytes, context: object):  # type: ignore[no-untyped-def]
        with blob.open("rb") as fh:
            while block := fh.read(CHUNK):
                yield block

    handler = grpc.method_handlers_generic_handler(
        "bench.Blob", {"Read": grpc.unary_stream_rpc_method_handler(read)}
    )
    await serve_raw_until_sigterm(state, ports_file, handler)


async def raw_stream(port: int, identity: DeviceIdentity, dest: Path | None = None) -> float:
    """Seconds to receive the whole file as a bare server stream; with `dest`, written to
    that file and fsynced (the least a durable download does)."""
    options = [("grpc.max_receive_message_length", 8 << 20)]
    async with aio.secure_channel(f"localhost:{port}", identity.credentials(), options) as ch:
        read: aio.UnaryStreamMultiCallable[bytes, bytes] = ch.unary_stream(READ)
        start = time.perf_counter()
        if dest is None:
            async for _ in read(b""):
                pass
        else:
            with dest.open("wb") as fh:
                async for block in read(b""):
                    fh.write(block)
                fh.flush()
                os.fsync(fh.fileno())
        return time.perf_counter() - start


async def downloader(identity: DeviceIdentity, digest: str, dest: Path) -> float:
    dl = Downloader(
        identity.info.device_address,
        identity.credentials(),
        channel_options(identity.info.tls_server_name),
        Backoff(0.1, 1.0),
    )
    start = time.perf_counter()
    await dl.fetch([(digest, dest)])
    return time.perf_counter() - start


def _assigned_blob(plane: PlaneProcess, work: Path, identity: DeviceIdentity, size: int) -> str:
    """A `size`-byte file of a model version pushed to the control plane and assigned to the
    device (it serves only those): a small trained bundle that lists the file too."""
    signing = load_secrets(plane.state).signing_key
    bundle = make_version(train_small(work / "model"), work / "bundle", "1", signing)
    with (bundle / "blob.bin").open("wb") as fh:
        for _ in range(0, size, CHUNK):
            fh.write(os.urandom(CHUNK))
    hexdigest = sha256_file(bundle / "blob.bin")
    manifest = read_own_bundle(bundle, signing)
    files = {**manifest.files, "blob.bin": hexdigest}
    write_signed_manifest(bundle, manifest.model_copy(update={"files": files}), signing)
    with plane.client() as client:
        model = client.push_bundle(bundle)
    store = open_store(f"sqlite:///{plane.state / 'autoglm.db'}")
    try:
        store.set_desired(
            [
                DesiredModel(
                    identity.info.device_id,
                    model.name,
                    model.version,
                    model.manifest_digest,
                    model.signature_digest,
                    "",
                    False,
                    dt.datetime.now(dt.UTC),
                )
            ]
        )
    finally:
        store.close()
    return "sha256:" + hexdigest


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--blob-server", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.blob_server:
        state, ports, blob = (Path(p) for p in args.blob_server)
        asyncio.run(_blob_server(state, ports, blob))
        return 0

    work = Path(tempfile.mkdtemp(prefix="autoglm-bench-dl-"))
    plane = start_plane_process(work)
    try:
        identity = enroll_fleet(plane, 0, 1)[0]
        size: int = args.size_mib << 20
        digest = _assigned_blob(plane, work, identity, size)
        blob = LocalArtifactStore(plane.state / "artifacts").path(digest)
        ports = work / "blob.json"
        command = [sys.executable, __file__, "--blob-server", str(plane.state), str(ports)]
        blob_server = spawn([*command, str(blob)], ports, work / "blob.log")
        try:
            port = json.loads(ports.read_text())["port"]
            print(
                f"download benchmark: {args.size_mib} MiB, {CHUNK >> 20} MiB chunks, "
                f"{os.cpu_count()} cores; servers in their own processes, clients here"
            )
            raw, raw_file, full = [], [], []
            (work / "dl").mkdir()
            for r in range(args.rounds):
                raw.append(asyncio.run(raw_stream(port, identity)))
                dest = work / "dl" / f"raw-{r}"
                raw_file.append(asyncio.run(raw_stream(port, identity, dest)))
                dest.unlink()
                dest = work / "dl" / f"agent-{r}"
                full.append(asyncio.run(downloader(identity, digest, dest)))
                dest.unlink()
        finally:
            stop(blob_server)
    finally:
        plane.stop()

    def rate(seconds: list[float]) -> float:
        return size / statistics.median(seconds) / 1e6

    result = {
        "size_mib": args.size_mib,
        "raw_stream_mb_s": rate(raw),
        "raw_stream_to_file_mb_s": rate(raw_file),
        "agent_download_mb_s": rate(full),
    }
    agent = result["agent_download_mb_s"]
    result["ratio_vs_raw_stream"] = agent / result["raw_stream_mb_s"]
    result["ratio_vs_raw_stream_to_file"] = agent / result["raw_stream_to_file_mb_s"]
    print(f"raw gRPC server stream, bytes dropped: {result['raw_stream_mb_s']:6.0f} MB/s")
    print(f"raw stream to a file + fsync:          {result['raw_stream_to_file_mb_s']:6.0f} MB/s")
    print(
        f"agent Downloader (DownloadArtifact, .part, sha256, fsync, rename): {agent:6.0f} MB/s "
        f"= {result['ratio_vs_raw_stream']:.2f}x the raw stream, "
        f"{result['ratio_vs_raw_stream_to_file']:.2f}x the raw stream to a file"
    )
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
