"""FastAPI app: a thin shell over store/ (database, artifacts) and the Celery broker."""
from .app import create_app
