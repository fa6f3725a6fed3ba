"""The operations both API faces (native and Tinker) share: validate, record in the registry, publish a task.

One code path, two faces: the blueprints only translate their wire format into calls here.
Never imports torch (DESIGN rule 1).
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict
from typing import Any, TypeVar

import msgpack
from celery import Celery
from celery.backends.redis import RedisBackend

from api import limits, validate
from api.custom_losses import custom_loss_name, resolve_custom_loss
from api.futures import PENDING, wait_result
from api.loss_graphs import resolve_graph
from api.validate import MAX_SAMPLES, MAX_TOPK, adam_spec, lora_spec, sampling_spec
from core.errors import Gone, NotFound, QuotaExceeded, UserError, unpublished_loss
from core.loss_graph import is_graph_loss_id
from core.registry import OUTBOX_GRACE_S, Outgoing, Registry, checkpoint_bytes_error
from core.settings import Settings
from tasks.celery_app import adapter_queue, sample_queue, worker_queue

log = logging.getLogger("tinkerbell.api")
_T = TypeVar("_T")

EXPIRED = "expired-"  # request id recorded for a seq_id the model stopped waiting for
NAME_RE = re.compile(r"^[A-Za-z0-9._-]{1,128}$")
CHECKPOINT_KINDS = ("weights", "sampler_weights", "external_weights")
BUILTIN_TTL_S = 10.0
LOST_AFTER_S = 10.0  # an adapter's next request published this long ago, on no queue and taken by no worker: lost
LOST_SCAN = 4  # how many of an adapter's next requests recover_lost looks at
SWEEP_EVERY_S = 5.0  # how often one API process looks for admitted requests an API process died before publishing


def encode_message(task: str, kwargs: dict[str, Any], kwargsrepr: str) -> str:
    """What the registry keeps of a request until it is on the broker: the task, its arguments (msgpack: arrays are
    bytes) and the short, readable argument summary Flower shows instead of them (never raw token arrays)."""
    return base64.b64encode(msgpack.packb([task, kwargs, kwargsrepr], use_bin_type=True)).decode()


def decode_message(message: str) -> tuple[str, dict[str, Any], str]:
    """(task name, kwargs, kwargsrepr) of an encode_message."""
    task, kwargs, kwargsrepr = msgpack.unpackb(base64.b64decode(message), raw=False)
    return task, kwargs, kwargsrepr


def _task_id(raw: Any, index: int | None = None) -> str | None:
    """The Celery task id in one of kombu's Redis records: a queued message, or (index 0) an unacked record."""
    try:
        message = json.loads(raw)
        if index is not None:
            message = message[index]
        return (message.get("headers") or {}).get("id")
    except (ValueError, TypeError, AttributeError, IndexError, KeyError):
        return None


def sequence_ids(request_id: str, num_samples: int) -> list[str]:
    """The SampledSequence.sequence_id of each sample of a sample request, in order (the SDK's sample_sequence_ids)."""
    return [f"{request_id}:{i}" for i in range(num_samples)]


class Service:
    """Stateless operations over the registry and the broker; one per app."""

    def __init__(self, settings: Settings, registry: Registry, celery: Celery, results: RedisBackend) -> None:
        """celery: the app that publishes; results: Celery's result backend the futures are read from."""
        self.settings = settings
        self.registry = registry
        self.celery = celery
        self.results = results
        self._builtin_losses: set[str] = set()
        self._builtin_read_at = float("-inf")
        self._swept_at = float("-inf")
        self._lost_checked: dict[str, float] = {}

    # ---- publishing -----------------------------------------------------------------------
    def _send(self, outgoing: list[Outgoing], own: dict[str, tuple[str, dict[str, Any], str]] | None = None) -> None:
        """Publish each request with Celery's send_task (task id = request id) in this order, then mark them published.

        own: the requests this call made, by request id, so their messages need not be decoded again. One that
        fails to publish stays in the registry's outbox and the sweep publishes it later.
        """
        sent: list[Outgoing] = []
        try:
            for item in outgoing:
                task, kwargs, kwargsrepr = (own or {}).get(item.request_id) or decode_message(item.message)
                self.celery.send_task(
                    task, kwargs=kwargs, task_id=item.request_id, queue=item.queue, argsrepr="()", kwargsrepr=kwargsrepr
                )
                sent.append(item)
        finally:
            ordered = adapter_queue("")
            self.registry.mark_published(
                [item.request_id for item in sent], keep=[item for item in sent if item.queue.startswith(ordered)]
            )

    def sweep(self, older_than_s: float = OUTBOX_GRACE_S) -> int:
        """Publish again what was admitted but is still not marked published older_than_s later: an API process
        died between admitting and publishing it. Returns how many. A request published twice is applied once
        (DESIGN rule 3); a sample may be computed twice, and its first stored result stands."""
        claimed = self.registry.claim_unpublished(older_than_s)
        if claimed:
            log.warning(
                "publishing %d admitted request(s) never published: %s",
                len(claimed),
                ", ".join(item.request_id for item in claimed),
            )
            self._send(claimed)
        return len(claimed)

    def _sweep_now_and_then(self) -> None:
        now = time.monotonic()
        if now - self._swept_at < SWEEP_EVERY_S:
            return
        self._swept_at = now
        try:
            self.sweep()
        except Exception:  # the request that happened to trigger the sweep is not its concern
            log.exception("outbox sweep failed")

    def publish(
        self,
        owner: str,
        kind: str,
        model_id: str | None,
        task: str,
        kwargs: dict[str, Any],
        queue: str,
        request_id: str,
        summary: dict[str, Any],
    ) -> None:
        """Record the future of a task that needs no ordering (create an adapter, sample), then publish it."""
        own = (task, kwargs, json.dumps(summary))
        message = encode_message(*own)
        # Creates are bounded by the adapters limit; restoring and parking are the service's own, never refused.
        limited = kind not in ("create_model", "restore_adapter", "park_adapter")
        outgoing = self._within_queue_limit(
            owner, lambda: self.registry.push(queue, message, request_id, owner, kind, model_id, limited=limited)
        )
        self._send([outgoing], {request_id: own})
        self._sweep_now_and_then()

    def submit_ordered(
        self,
        owner: str,
        model_id: str,
        seq_id: int | None,
        task: str,
        kwargs: dict[str, Any],
        kind: str,
        summary: dict[str, Any],
    ) -> str:
        """Admit a request that touches the owner's model (one atomic script, which also checks the model is the
        owner's and releases each seq_id once, in order), then publish what it made ready, in seq_id order."""
        seq_id = validate.seq_id(seq_id)
        reserved = seq_id is None
        if reserved:
            seq_id = self.registry.next_seq(model_id, owner)
        request_id = str(uuid.uuid4())
        own = (task, {**kwargs, "seq_id": seq_id}, json.dumps({**summary, "seq_id": seq_id}))
        queue = adapter_queue(model_id)
        message = encode_message(*own)
        try:
            answer_id, ready = self._within_queue_limit(
                owner, lambda: self.registry.submit(model_id, seq_id, request_id, message, queue, owner, kind)
            )
        except QuotaExceeded:
            if reserved:  # the seq_id handed out here is nobody's to resend: later requests must not wait for it
                self.skip_seq(owner, model_id, seq_id)
            raise
        if answer_id.startswith(EXPIRED):
            raise UserError(
                f"seq_id {seq_id}: arrived after {model_id}'s later requests waited "
                f"{self.settings.seq_gap_timeout_s:g} s for it and ran without it"
            )
        self._send(ready, {request_id: own})
        if ready.parked:
            self.place_parked(model_id)
        self._sweep_now_and_then()
        return answer_id

    def _within_queue_limit(self, owner: str, admit: Callable[[], _T]) -> _T:
        """admit(), and once more if the owner's queued-requests limit refused it but the count held requests that
        had finished without being counted out (Registry.prune_queued); QuotaExceeded (429) if it is still full."""
        try:
            return admit()
        except QuotaExceeded as exc:
            if exc.status != 429 or self.registry.prune_queued(owner, self._have_results) >= (
                self.settings.max_queued_requests_per_key
            ):
                raise
            return admit()

    def _have_results(self, request_ids: list[str]) -> list[bool]:
        with self.results.client.pipeline(transaction=False) as pipe:
            for request_id in request_ids:
                pipe.exists(self.results.get_key_for_task(request_id))
            return [bool(found) for found in pipe.execute()]

    def check_checkpoint_room(self, owner: str) -> None:
        """Refuse a save (403) when the owner's checkpoints already fill TINKERBELL_MAX_CHECKPOINT_BYTES_PER_KEY; the
        worker checks the written size against it too (a save that would cross it fails its future)."""
        limit = self.settings.max_checkpoint_bytes_per_key
        if limit > 0:
            stored = self.registry.usage(owner)["checkpoint_bytes"]
            if stored >= limit:
                raise checkpoint_bytes_error(self.settings, stored)

    def place_parked(self, model_id: str) -> str | None:
        """A parked adapter (its session idled, or its worker died) goes to the training worker with the fewest
        adapters, which restores it from its autosave and then consumes its queue, where its requests wait. Returns
        that worker, or None when it was not parked (or no training worker is alive: the next poll tries again)."""
        record = self.registry.model_any(model_id)
        if not record or record.get("deleted") or record.get("status") != "parked":
            return None
        worker = self.registry.pick_worker(record["base_model"])
        if worker is None:
            log.warning("%s is parked and no training worker is alive to restore it", model_id)
            return None
        epoch = self.registry.place(model_id, worker)
        if not epoch:
            return None  # another API thread placed it first
        self.publish(
            record["owner"],
            "restore_adapter",
            model_id,
            "tinkerbell.restore_adapter",
            {"model_id": model_id, "epoch": epoch},
            worker_queue(worker),
            str(uuid.uuid4()),
            {"model_id": model_id, "epoch": epoch},
        )
        log.info("placed parked %s on %s (epoch %d)", model_id, worker, epoch)
        return worker

    def finish_session(self, owner: str, session_id: str, status: str) -> None:
        """ServiceClient.close: the session takes no new requests, and its adapters are parked now (each once the
        requests already admitted for it have run: the sweep parks what is still busy)."""
        for model_id in self.registry.finish_session(session_id, owner, status):
            placement = self.registry.placement(model_id)
            if placement is None or placement.deleted or not placement.worker:
                continue
            self.publish(
                owner,
                "park_adapter",
                model_id,
                "tinkerbell.park_adapter",
                {"model_id": model_id},
                worker_queue(placement.worker),
                str(uuid.uuid4()),
                {"model_id": model_id},
            )

    def skip_seq(self, owner: str, model_id: str, seq_id: int) -> None:
        """Use up the seq_id of a request api/ refused (HTTP 4xx), so the model's later requests are not held behind it.

        The Tinker SDK numbers requests on the client without gaps; one it could not submit still reserved its id.
        """
        with contextlib.suppress(NotFound, Gone):
            refused = f"refused-{uuid.uuid4()}"
            _, ready = self.registry.submit(model_id, seq_id, refused, "", adapter_queue(model_id), owner)
            self._send(ready)

    def release_stalled(self, model_id: str) -> None:
        """Requests held behind a seq_id that never came (a client gave up on it) run without it after a timeout."""
        ready = self.registry.release_gap(model_id, self.settings.seq_gap_timeout_s, adapter_queue(model_id))
        if ready:
            self._send(ready)

    def is_builtin_loss(self, name: str) -> bool:
        """From the catalog the workers publish, re-read at most every BUILTIN_TTL_S (built-ins change only when
        workers are upgraded; no custom loss can take a built-in's name)."""
        now = time.monotonic()
        if now - self._builtin_read_at > BUILTIN_TTL_S:
            self._builtin_losses, self._builtin_read_at = self.registry.builtin_loss_names(), now
        return name in self._builtin_losses

    def poll(self, future: dict[str, Any], request_id: str, timeout_s: float) -> Any:
        """Long-poll one future (api.futures.wait_result). A pending ordered request may be stalled behind a gap, and
        a pending one may have been admitted by an API process that died before publishing it (the sweep)."""
        if future.get("model_id") and self.registry.placement_status(future["model_id"]) == "parked":
            self.place_parked(future["model_id"])  # its holder died, or it was parked before a request placed it
        outcome = wait_result(self.results, request_id, timeout_s)
        if outcome is PENDING:
            if future.get("model_id"):
                self.release_stalled(future["model_id"])
                try:
                    self.recover_lost(future["model_id"])
                except Exception:  # the poll that happened to trigger it is not its concern
                    log.exception("looking for lost requests of %s failed", future["model_id"])
            self._sweep_now_and_then()
        return outcome

    def recover_lost(self, model_id: str) -> list[str]:
        """Publish again the adapter's next requests (up to LOST_SCAN after its applied_seq) that were published more
        than LOST_AFTER_S ago, have no result, and are neither on its queue nor taken by a worker (kombu's unacked
        record). Redis hands a message to a worker's BRPOP before the worker records it as unacked; a Redis restart
        between the two loses it, and the adapter's later requests would wait for it for ever. A copy published twice
        is applied once (DESIGN rule 3). Looks at each model at most every LOST_AFTER_S per API process. Returns the
        request ids published again."""
        now = time.monotonic()
        if now - self._lost_checked.get(model_id, float("-inf")) < LOST_AFTER_S:
            return []
        if len(self._lost_checked) > 10_000:
            self._lost_checked.clear()
        self._lost_checked[model_id] = now
        applied = int((self.registry.model_any(model_id) or {}).get("applied_seq", 0))
        admitted = self.registry.admitted_between(model_id, applied, applied + LOST_SCAN + 1)
        real = [rid for rid in admitted.values() if not rid.startswith(("refused-", EXPIRED))]
        stale = time.time() - LOST_AFTER_S
        kept = {rid: item for rid, (item, published) in self.registry.sent(real).items() if published < stale}
        if not kept:
            return []
        queue = adapter_queue(model_id)
        with self.celery.connection_for_write() as connection:
            channel = connection.default_channel
            with channel.conn_or_acquire() as client:
                on_queue = {_task_id(raw) for raw in client.lrange(queue, 0, -1)}
                taken = {_task_id(record, 0) for _tag, record in client.hscan_iter(channel.unacked_key)}
        candidates = [rid for rid in kept if rid not in on_queue and rid not in taken]
        lost = [kept[rid] for rid, done in zip(candidates, self._have_results(candidates)) if not done]
        if lost:
            log.warning(
                "%s: publishing again %d request(s) on no queue and taken by no worker (lost in a Redis restart): %s",
                model_id,
                len(lost),
                ", ".join(item.request_id for item in lost),
            )
            self._send(lost)
        return [item.request_id for item in lost]

    # ---- sessions and models --------------------------------------------------------------
    def check_base_model(self, base_model: str | None, field: str = "base_model") -> str:
        """The base model a request names (none: the default), if this deployment serves it (TINKERBELL_BASE_MODELS)."""
        base_model = base_model or self.settings.default_base_model
        if not isinstance(base_model, str) or base_model not in self.supported_models():
            raise UserError(
                f"{field}: base model {base_model!r:.200} is not served here; served: "
                f"{', '.join(self.supported_models())} (TINKERBELL_BASE_MODELS)"
            )
        return base_model

    def supported_models(self) -> list[str]:
        """Exactly what TINKERBELL_BASE_MODELS lists (else TINKERBELL_BASE_MODEL alone): what a deployment serves."""
        return sorted(self.settings.worker_base_models)

    def create_model(
        self,
        owner: str,
        session_id: str | None,
        model_seq_id: int | None,
        base_model: str | None,
        lora: dict[str, Any] | None,
        user_metadata: dict | None = None,
        load: dict[str, Any] | None = None,
    ) -> tuple[str, str]:
        """Place a new adapter on a worker; returns (model_id, request_id).

        load: {"dir", "with_optimizer"} to restore one from a checkpoint."""
        base_model = self.check_base_model(base_model)
        spec = lora_spec(lora)
        session_id = validate.optional_string(session_id, "session_id")
        model_seq_id = validate.optional_integer(model_seq_id, "model_seq_id")
        user_metadata = validate.metadata(user_metadata)
        if session_id is None:
            session_id = self.registry.create_session(owner, tags=["native"])
        else:
            self.registry.live_session(session_id, owner)
        if model_seq_id is None:
            model_seq_id = int(self.registry.redis.hincrby(f"tb:session:{session_id}:counters", "model_seq_id", 1)) - 1
        model_id = f"{session_id}:train:{model_seq_id}"
        worker = self.registry.pick_worker(base_model)
        if worker is None:
            raise UserError("no live worker: start one with `python -m tasks.worker --device cpu` (or cuda:N)")
        request_id = str(uuid.uuid4())
        if not self.registry.create_model(model_id, owner, session_id, base_model, asdict(spec), worker, user_metadata):
            existing = self.registry.model(model_id, owner)
            if (
                existing.get("create_request_id")
                and existing["base_model"] == base_model
                and existing["lora"] == asdict(spec)
            ):
                return model_id, existing["create_request_id"]  # a re-sent create (lost response): same future
            raise UserError(f"model_seq_id: model {model_id} already exists in this session")
        self.registry.update_model(model_id, create_request_id=request_id)
        kwargs = {
            "model_id": model_id,
            "base_model": base_model,
            "lora": asdict(spec),
            "load_path": (load or {}).get("dir"),
            "with_optimizer": bool((load or {}).get("with_optimizer")),
        }
        self.publish(
            owner,
            "create_model",
            model_id,
            "tinkerbell.create_adapter",
            kwargs,
            worker_queue(worker),
            request_id,
            {"model_id": model_id, "base_model": base_model, "rank": spec.rank},
        )
        return model_id, request_id

    def remove_model(self, owner: str, model_id: str) -> str:
        return self.submit_ordered(
            owner,
            model_id,
            None,
            "tinkerbell.remove_adapter",
            {"model_id": model_id},
            "remove_model",
            {"model_id": model_id},
        )

    # ---- training -------------------------------------------------------------------------
    def forward_backward(
        self,
        owner: str,
        model_id: str,
        seq_id: int | None,
        data: list[dict[str, Any]],
        loss_fn: str,
        loss_fn_config: dict[str, Any],
        forward_only: bool,
    ) -> str:
        """data: wire datums (core.wire.encode_datum), checked by the caller (api.datums.check_datum)."""
        if not data:
            raise UserError("data: empty batch; send at least one datum")
        limits.check_batch(self.settings, data)
        if not isinstance(loss_fn, str) or not loss_fn:
            raise UserError("loss_fn: must be a loss name")
        loss_fn_config = validate.plain(validate.mapping(loss_fn_config, "loss_fn_config"), "loss_fn_config")
        forward_only = validate.boolean(forward_only, "forward_only")
        custom_loss = loss_graph = None
        if loss_fn == "custom" and is_graph_loss_id(loss_fn_config.get("loss_id")):
            self.registry.model(model_id, owner)  # another key's model is NotFound before its loss is looked up
            loss_graph = resolve_graph(self.registry, owner, loss_fn_config["loss_id"])
        elif loss_fn == "custom" or not self.is_builtin_loss(loss_fn):
            name = custom_loss_name(loss_fn, loss_fn_config)
            _model, catalog, builtin, custom_meta = self.registry.model_and_loss(model_id, owner, name)
            custom_loss = resolve_custom_loss(self.settings, owner, loss_fn, name, builtin, custom_meta)
            if (
                custom_loss is None and catalog and not builtin
            ):  # before a worker published the catalog, the worker decides
                refusal = unpublished_loss(loss_fn, self.registry.builtin_loss_names())
                raise refusal or UserError(f"loss_fn: unknown loss {loss_fn!r}; see GET /list_loss_functions")
        shape = f"{len(data)}x{max(d['tokens']['shape'][0] for d in data)}"
        kwargs = {
            "model_id": model_id,
            "data": data,
            "loss_fn": loss_fn,
            "loss_fn_config": loss_fn_config,
            "forward_only": forward_only,
        }
        if custom_loss is not None:
            kwargs["custom_loss"] = (
                custom_loss  # the version current now, so re-registering changes later requests only
            )
        if loss_graph is not None:
            kwargs["loss_graph"] = loss_graph  # the graph is read by the worker from the owner's key
        kind = "forward" if forward_only else "forward_backward"
        return self.submit_ordered(
            owner,
            model_id,
            seq_id,
            "tinkerbell.forward_backward",
            kwargs,
            kind,
            {"model_id": model_id, "loss_fn": loss_fn, "batch": shape, "forward_only": forward_only},
        )

    def optim_step(self, owner: str, model_id: str, seq_id: int | None, adam_params: dict[str, Any] | None) -> str:
        spec = adam_spec(adam_params)
        kwargs = {"model_id": model_id, "adam_params": asdict(spec)}
        return self.submit_ordered(
            owner,
            model_id,
            seq_id,
            "tinkerbell.optim_step",
            kwargs,
            "optim_step",
            {"model_id": model_id, "lr": spec.learning_rate},
        )

    def save_state(
        self,
        owner: str,
        model_id: str,
        seq_id: int | None,
        name: str | None,
        kind: str,
        ttl_seconds: int | None = None,
        sampler_id: str | None = None,
    ) -> str:
        if name is None:
            name = f"{kind}-{int(time.time() * 1000)}"
        if not isinstance(name, str) or not NAME_RE.fullmatch(name) or not name.strip("."):
            raise UserError(
                f"path: checkpoint name {name!r:.80} must be 1-128 of letters, digits, '.', '_' or '-', not only dots "
                "(a name, not a tinker:// path; no '/', NUL or '..')"
            )
        ttl_seconds = validate.ttl_seconds(ttl_seconds)
        if sampler_id is None:  # sampler snapshots are counted, not refused: TINKERBELL_EPHEMERAL_KEEP bounds them
            self.check_checkpoint_room(owner)
        kwargs = {
            "model_id": model_id,
            "name": name,
            "kind": kind,
            "ttl_seconds": ttl_seconds,
            "sampler_id": sampler_id,
        }
        return self.submit_ordered(
            owner,
            model_id,
            seq_id,
            "tinkerbell.save_state",
            kwargs,
            f"save_{kind}",
            {"model_id": model_id, "name": name, "kind": kind},
        )

    def resolve_checkpoint(self, owner: str, path: str, kinds: tuple[str, ...] = CHECKPOINT_KINDS) -> dict[str, Any]:
        """tinker://<model_id>/<kind>/<name> -> the checkpoint record; other keys' checkpoints are NotFound unless
        public."""
        if not isinstance(path, str) or not path.startswith("tinker://"):
            raise UserError(f"path: must look like tinker://<model_id>/<weights|sampler_weights>/<name>, got {path!r}")
        parts = path[len("tinker://") :].split("/")
        if len(parts) != 3 or parts[1] not in kinds:
            raise UserError(f"path: must look like tinker://<model_id>/<{'|'.join(kinds)}>/<name>, got {path!r}")
        model_id, kind, name = parts
        checkpoint = self.registry.checkpoint(model_id, f"{kind}/{name}")
        if checkpoint is None or (checkpoint.get("owner") != owner and not checkpoint.get("public")):
            raise NotFound(f"path: no checkpoint {path}")
        return checkpoint

    def load_state(self, owner: str, model_id: str, seq_id: int | None, path: str, with_optimizer: bool) -> str:
        with_optimizer = validate.boolean(with_optimizer, "optimizer")
        checkpoint = self.resolve_checkpoint(owner, path, ("weights",) if with_optimizer else CHECKPOINT_KINDS)
        kwargs = {"model_id": model_id, "directory": checkpoint["dir"], "with_optimizer": with_optimizer, "path": path}
        return self.submit_ordered(
            owner,
            model_id,
            seq_id,
            "tinkerbell.load_state",
            kwargs,
            "load_weights",
            {"model_id": model_id, "path": path},
        )

    def create_model_from_checkpoint(
        self,
        owner: str,
        session_id: str,
        model_seq_id: int | None,
        path: str,
        with_optimizer: bool,
        user_metadata: dict | None = None,
    ) -> tuple[str, str]:
        with_optimizer = validate.boolean(with_optimizer, "optimizer")
        checkpoint = self.resolve_checkpoint(owner, path, ("weights",) if with_optimizer else CHECKPOINT_KINDS)
        return self.create_model(
            owner,
            session_id,
            model_seq_id,
            checkpoint["base_model"],
            checkpoint["lora"],
            user_metadata,
            load={"dir": checkpoint["dir"], "with_optimizer": with_optimizer},
        )

    # ---- sampling -------------------------------------------------------------------------
    def sample(
        self,
        owner: str,
        base_model: str,
        adapter_dir: str | None,
        prompt: dict[str, Any],
        sampling_params: dict[str, Any] | None,
        num_samples: int,
        prompt_logprobs: bool,
        topk_prompt_logprobs: int | None,
        topk_sample_logprobs: int | None = None,
        target_prompt_logprobs: dict[str, Any] | None = None,
        prompt_alt_tokens_k: int | None = None,
        record_stability_info: bool | None = None,
        sampler_id: str | None = None,
    ) -> str:
        """prompt: a wire array of token ids, checked by the caller (api.datums.check_tokens).
        target_prompt_logprobs: as api.datums.target_prompt_cells makes it. record_stability_info: keep each returned
        sequence_id (sequence_ids) on record for TINKERBELL_SEQUENCE_TTL_S; no loss reads them yet."""
        spec = sampling_spec(sampling_params)
        num_samples = validate.integer(num_samples, "num_samples", 1, MAX_SAMPLES)
        prompt_logprobs = validate.boolean(prompt_logprobs, "prompt_logprobs")
        topk = validate.optional_integer(topk_prompt_logprobs, "topk_prompt_logprobs", 0, MAX_TOPK) or 0
        topk_sample = validate.optional_integer(topk_sample_logprobs, "topk_sample_logprobs", 0, MAX_TOPK) or 0
        alt_k = validate.optional_integer(prompt_alt_tokens_k, "prompt_alt_tokens_k", 0, MAX_TOPK) or 0
        record = validate.boolean(record_stability_info, "record_stability_info")
        limits.check_sample(self.settings, int(prompt["shape"][0]), num_samples, spec.max_tokens)
        request_id = str(uuid.uuid4())
        kwargs = {
            "base_model": base_model,
            "adapter_dir": adapter_dir,
            "prompt": prompt,
            "sampling_params": asdict(spec),
            "num_samples": num_samples,
            "prompt_logprobs": prompt_logprobs,
            "topk_prompt_logprobs": topk,
        }
        extras = {
            "topk_sample_logprobs": topk_sample,
            "target_prompt_logprobs": target_prompt_logprobs,
            "prompt_alt_tokens_k": alt_k,
        }
        kwargs.update((k, v) for k, v in extras.items() if v)  # absent: a worker of the previous version still runs it
        if record:
            ids = sequence_ids(request_id, num_samples)
            self.registry.record_sequences(owner, sampler_id, request_id, ids, self.settings.sequence_ttl_s)
        self.publish(
            owner,
            "sample",
            None,
            "tinkerbell.sample",
            kwargs,
            sample_queue(base_model),
            request_id,
            {
                "base_model": base_model,
                "adapter": adapter_dir is not None,
                "prompt_len": prompt["shape"][0],
                "num_samples": num_samples,
                "max_tokens": spec.max_tokens,
            },
        )
        return request_id

    def sampler_target(self, owner: str, base_model: str | None, model_path: str | None) -> tuple[str, str | None]:
        """(base_model, adapter_dir) for a sampling client that names a base model or saved weights."""
        if model_path:
            checkpoint = self.resolve_checkpoint(owner, model_path)
            return self.check_base_model(checkpoint["base_model"], "model_path"), checkpoint["dir"]
        return self.check_base_model(base_model), None
