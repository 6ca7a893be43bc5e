"""The model catalog: pushed bundles, checked and stored by digest.

A push streams every file of a bundle (`PushBundleChunk`: a header, then its data) into the
artifact store; the catalog then checks what agents will check (the manifest signature with
the control plane's signing key, every listed file present with its digest) before the
version becomes visible. Nothing half-pushed can be rolled out.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import PurePosixPath

from cryptography.exceptions import InvalidSignature

from cloud.artifacts import PREFIX, ArtifactStore, ArtifactWriter, parse_digest
from cloud.clock import Clock, utc_now
from cloud.domain import DeviceRecord, ModelRecord
from cloud.store import Store
from edge_agent.bundle import MANIFEST, SIGNATURE, Manifest, bundle_paths, parse_manifest
from edge_agent.errors import IntegrityError, InvalidInput, NotFound
from edge_agent.trust import Verifier

MAX_BUNDLE_BYTES = 4 << 30


def bundle_files(manifest: Manifest) -> dict[str, str]:
    """Every file a manifest lists, path -> artifact digest."""
    return {path: PREFIX + digest for path, digest in bundle_paths(manifest).items()}


@dataclass(frozen=True)
class BundleFile:
    """The header of one file of a pushed bundle; its bytes follow."""

    path: str
    digest: str
    size: int


def assigned_artifacts(store: Store, device: DeviceRecord) -> set[str]:
    """Digests a device may download: every file of the model version the control plane
    assigned to it (its desired state: a new version, a shadow candidate, or the version an
    abort sends it back to). What a device says it serves grants nothing: any device could
    claim any model."""
    wanted: set[tuple[str, str]] = set()
    desired = store.get_desired(device.id)
    if desired is not None:
        wanted.add((desired.model_name, desired.model_version))
    digests: set[str] = set()
    for name, version in wanted:
        try:
            record = store.get_model(name, version)
        except NotFound:  # not pushed here: the device has it from its own config
            continue
        digests.update((record.manifest_digest, record.signature_digest))
        try:
            digests.update(bundle_files(Manifest.model_validate(record.manifest)).values())
        except ValueError:
            continue
    return digests


def _check_path(path: str) -> str:
    pure = PurePosixPath(path)
    if not path or pure.is_absolute() or ".." in pure.parts or "\\" in path:
        raise InvalidInput(f"bundle file path {path!r} must be relative, inside the bundle")
    return str(pure)


class ModelCatalog:
    """Receives pushes, answers model queries."""

    def __init__(
        self,
        store: Store,
        artifacts: ArtifactStore,
        signing_key: Verifier,
        max_bundle_bytes: int = MAX_BUNDLE_BYTES,
        clock: Clock = utc_now,
    ) -> None:
        self.store = store
        self.artifacts = artifacts
        self.signing_key = signing_key
        self.max_bundle_bytes = max_bundle_bytes
        self.clock = clock

    async def receive(self, chunks: AsyncIterator[BundleFile | bytes]) -> ModelRecord:
        """Stores each file as it streams in (a `BundleFile` header, then its bytes);
        registers the bundle when all arrived."""
        files: dict[str, tuple[str, int]] = {}
        writer: ArtifactWriter | None = None
        header: BundleFile | None = None
        received = total = 0

        async def finish() -> None:
            assert header is not None and writer is not None
            if received != header.size:
                raise InvalidInput(
                    f"bundle file {header.path}: {received} bytes arrived, header said "
                    f"{header.size}"
                )
            await asyncio.to_thread(writer.commit)
            files[header.path] = (header.digest, received)

        try:
            async for chunk in chunks:
                if isinstance(chunk, BundleFile):
                    if header is not None:
                        await finish()
                    header = chunk
                    path = _check_path(header.path)
                    if path in files:
                        raise InvalidInput(f"bundle file {path} was sent twice")
                    parse_digest(header.digest)
                    total += header.size
                    if total > self.max_bundle_bytes:
                        raise InvalidInput(
                            f"bundle is larger than the limit of {self.max_bundle_bytes} bytes"
                        )
                    writer = self.artifacts.open_writer(header.digest)
                    received = 0
                else:
                    if writer is None or header is None:
                        raise InvalidInput("bundle data arrived before any file header")
                    received += len(chunk)
                    if received > header.size:
                        raise InvalidInput(
                            f"bundle file {header.path}: more bytes than its header's {header.size}"
                        )
                    writer.write(chunk)
            if header is not None:
                await finish()
        finally:
            if writer is not None:
                writer.abort()
        return await asyncio.to_thread(self.register, files)

    def register(self, files: dict[str, tuple[str, int]]) -> ModelRecord:
        """Checks a bundle whose files are in the artifact store, then records it."""
        for needed in (MANIFEST, SIGNATURE):
            if needed not in files:
                raise InvalidInput(f"the pushed bundle has no {needed}")
        manifest_digest, signature_digest = files[MANIFEST][0], files[SIGNATURE][0]
        raw = b"".join(self.artifacts.read(manifest_digest))
        try:
            self.signing_key.verify(b"".join(self.artifacts.read(signature_digest)), raw)
        except InvalidSignature:
            raise IntegrityError(
                "the bundle's manifest signature does not verify with this control plane's "
                "signing key; sign it with STATE_DIR/signing.key (autoglm model train/export "
                "--signing-key)"
            ) from None
        manifest = parse_manifest(raw, "pushed manifest.json")
        for path, digest in sorted(bundle_files(manifest).items()):
            if path not in files:
                raise InvalidInput(f"the manifest lists {path}, which was not pushed")
            if files[path][0] != digest:
                raise IntegrityError(
                    f"{path} was pushed as {files[path][0][:23]}…, the manifest says {digest[:23]}…"
                )
        record = ModelRecord(
            name=manifest.name,
            version=manifest.version,
            manifest_digest=manifest_digest,
            signature_digest=signature_digest,
            size_bytes=sum(size for _, size in files.values()),
            pushed_at=self.clock(),
            manifest=json.loads(raw),
        )
        return self.store.add_model(record)
