"""Errors that cross the broker: a worker raises them, api/ turns them into a category for the client."""

from __future__ import annotations

from collections.abc import Iterable


class UserError(Exception):
    """A request that can never succeed as sent (bad field, unknown model, ...).

    Reported to the client with category ``user``; the worker keeps serving others.
    """


class NotFound(UserError):
    """The named object does not exist or belongs to another key (the two are not told apart)."""


class QuotaExceeded(UserError):
    """A per-key limit (TINKERBELL_MAX_*_PER_KEY) is reached; the message names the limit and the current use.

    status 429 (retry_after_s set): the use falls by itself as requests finish, so the SDK's retry is the right
    answer. status 403: only the key's owner can free it (remove an adapter, delete checkpoints)."""

    def __init__(self, message: str, status: int = 403, retry_after_s: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after_s = retry_after_s


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


class Gone(UserError):
    """The object existed but was finished (a closed session): HTTP 410, which the SDK does not retry."""
