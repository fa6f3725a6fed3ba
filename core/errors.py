"""Errors that cross the broker: a worker raises them, api/ turns them into a category for the client."""

from __future__ import annotations

from collections.abc import Iterable


class UserError(Exception):
    """A request that can never succeed as sent (bad field, unknown model, ...).

    Reported to the client with category ``user``; the worker keeps serving others.
    """


class NotFound(UserError):
    """The named object does not exist or belongs to another key (the two are not told apart)."""


def unpublished_loss(loss_fn: str, builtins: Iterable[str]) -> UserError | None:
    """The refusal of a Tinker loss whose formula is not public (stable_reinforce), naming the losses that exist;
    None for any other name. api/ and the workers' loss registry give the same message."""
    if loss_fn != "stable_reinforce":
        return None
    return UserError(
        "loss_fn: 'stable_reinforce' is not supported: its formula is not public (neither the Tinker SDK nor its docs "
        f"define it), so this service cannot compute it; the losses that exist: {', '.join(sorted(builtins))}, or a "
        "custom loss of your own (CUSTOM_LOSS_GUIDE.md)"
    )
