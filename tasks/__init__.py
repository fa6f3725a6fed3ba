"""Celery tasks and workers. `celery -A tasks inspect …` finds the app here."""

from tasks.celery_app import app

__all__ = ["app"]
