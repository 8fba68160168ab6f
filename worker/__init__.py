"""Celery worker: thin shell that claims jobs from the database and runs core/ (imported in the child only)."""
