"""The retraining-data calls of OperatorService (a mixin of OperatorServicer): captured
windows with their verdicts, and pulling a pushed bundle back as the base of a fine-tuning."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import AsyncIterator, Iterator
from typing import Any

from grpc import aio

from cloud.captures import (
    MAX_PAGE_SIZE,
    PAGE_SIZE,
    VERDICT_FILTERS,
    CaptureFilter,
    labelled_pages,
)
from cloud.catalog import ModelCatalog, bundle_files
from cloud.devices import DeviceRegistry
from cloud.selectors import parse_selector
from cloud.service.serde import capture_to_proto
from edge_agent.bundle import MANIFEST, SIGNATURE, Manifest
from edge_agent.errors import InvalidInput
from protos.autoglm.v1 import operator_pb2

_DONE = object()


MAX_MESSAGE_BYTES = 2 << 20  # a largest capture (256 KiB of values) always fits with room


class CaptureCalls:
    registry: DeviceRegistry
    catalog: ModelCatalog

    def _capture_filter(
        self, request: operator_pb2.ListCapturesRequest
    ) -> tuple[CaptureFilter, dict[str, str]]:
        """The filter of a request, and the names of the devices it may return."""
        if not request.HasField("since"):
            raise InvalidInput("since: required (how far back, e.g. --since 30d)")
        if request.verdict not in VERDICT_FILTERS:
            raise InvalidInput(
                f"verdict: {request.verdict!r} is not one of {', '.join(VERDICT_FILTERS[1:])}"
            )
        devices = self.registry.list(parse_selector(request.selector))
        if request.device:
            one = self.registry.get(request.device)  # NotFound names it
            devices = [d for d in devices if d.id == one.id]
        names = {d.id: d.name for d in devices}
        since = request.since.ToDatetime(tzinfo=dt.UTC)
        return CaptureFilter(since, tuple(sorted(names)), request.verdict), names

    async def ListCaptures(
        self, request: operator_pb2.ListCapturesRequest, context: aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[operator_pb2.CapturePage]:
        if request.page_size > MAX_PAGE_SIZE:
            raise InvalidInput(f"page_size: {request.page_size} > {MAX_PAGE_SIZE}")
        where, names = await asyncio.to_thread(self._capture_filter, request)
        pages = labelled_pages(self.registry.store, where, request.page_size or PAGE_SIZE)
        while (page := await asyncio.to_thread(next, pages, _DONE)) is not _DONE:
            assert isinstance(page, list)
            # Messages end at MAX_MESSAGE_BYTES whatever the page size: a page of large
            # windows would pass gRPC's limits (4 MiB a client takes by default).
            message, size = operator_pb2.CapturePage(), 0
            for c, lab in page:
                window = capture_to_proto(c, lab, names.get(c.device_id, ""))
                if message.windows and size + window.ByteSize() > MAX_MESSAGE_BYTES:
                    yield message
                    message, size = operator_pb2.CapturePage(), 0
                message.windows.append(window)
                size += window.ByteSize()
            if message.windows:
                yield message
            del page, message  # neither held while the next page is read

    async def PullBundle(
        self, request: operator_pb2.GetModelRequest, context: aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[operator_pb2.PushBundleChunk]:
        record = await asyncio.to_thread(
            self.registry.store.get_model, request.name, request.version
        )
        files = bundle_files(Manifest.model_validate(record.manifest))
        files |= {MANIFEST: record.manifest_digest, SIGNATURE: record.signature_digest}
        order = [*sorted(set(files) - {MANIFEST, SIGNATURE}), MANIFEST, SIGNATURE]
        artifacts = self.catalog.artifacts
        for path in order:
            digest = files[path]
            size = await asyncio.to_thread(artifacts.size, digest)
            header = operator_pb2.BundleFileHeader(path=path, size=size, digest=digest)
            yield operator_pb2.PushBundleChunk(file=header)
            blocks: Iterator[bytes] = artifacts.read(digest)
            while (block := await asyncio.to_thread(next, blocks, _DONE)) is not _DONE:
                assert isinstance(block, bytes)
                yield operator_pb2.PushBundleChunk(data=block)
