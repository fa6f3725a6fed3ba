"""Errors that cross the broker: a worker raises them, api/ turns them into a category for the client."""

from __future__ import annotations


class UserError(Exception):
    """A request that can never succeed as sent (bad field, unknown model, ...).

    Reported to the client with category ``user``; the worker keeps serving others.
    """


class NotFound(UserError):
    """The named object does not exist or belongs to another key (the two are not told apart)."""
