"""Artifact stores: where verified bundles live. A local filesystem, or one receivers share."""

from trainfleet.store.local import LocalStore, Upload
from trainfleet.store.shared import SharedStore

__all__ = ["LocalStore", "SharedStore", "Upload"]
