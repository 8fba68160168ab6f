"""Python client for the Metashrink HTTP API (and the ``metashrink`` CLI in client.cli)."""
from .sdk import Client, ApiError
