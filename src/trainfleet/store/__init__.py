"""Artifact stores: where verified bundles live. A local filesystem, a filesystem receivers
share, or an S3-compatible bucket; `open_store` picks one from `--store`."""

from __future__ import annotations

from pathlib import Path

from trainfleet.store.base import KINDS, ArtifactStore, ArtifactUpload, check_kind, kind_of
from trainfleet.store.local import LocalStore, Upload
from trainfleet.store.shared import SharedStore


def open_store(spec: str | None, default_root: Path,
               s3_endpoint_url: str | None = None) -> ArtifactStore:
    """`--store`: s3://bucket/prefix, a shared path, or None for this receiver's own dir."""
    if spec and spec.startswith("s3://"):
        from trainfleet.store.s3 import S3Store  # boto3 is imported only when asked for

        return S3Store(spec, endpoint_url=s3_endpoint_url)
    if spec:
        return SharedStore(Path(spec))
    return LocalStore(default_root)


__all__ = ["KINDS", "ArtifactStore", "ArtifactUpload", "LocalStore", "SharedStore", "Upload",
           "check_kind", "kind_of", "open_store"]
