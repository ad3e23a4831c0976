"""Artifact stores: where verified bundles live. Only the local filesystem store exists so far."""

from trainfleet.store.local import LocalStore, Upload

__all__ = ["LocalStore", "Upload"]
