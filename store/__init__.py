"""Persistence: settings, SQLAlchemy models and queries, the artifact store, migrations runner."""
from .settings import Settings, get_settings
