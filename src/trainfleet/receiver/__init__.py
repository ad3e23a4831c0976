"""The receiver: the HTTP service that owns the queue database and the artifact store.

Needs the server extra (FastAPI, uvicorn); nothing on the worker side imports it.
"""

from trainfleet.receiver.app import create_app
from trainfleet.receiver.settings import ReceiverSettings

__all__ = ["ReceiverSettings", "create_app"]
