"""ASGI entry point for uvicorn / gunicorn: ``uvicorn api.main:app`` (settings from METASHRINK_* env vars)."""
from api.app import create_app

app = create_app()
