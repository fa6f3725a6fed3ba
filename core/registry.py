"""The registry in Redis: API keys (hashed), sessions, models and their placement, workers, checkpoints, futures.

Every object records its `owner` (the key id that made it); lookups with another owner answer NotFound,
so one key can never tell another key's objects from missing ones.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import time
import uuid
from typing import Any

import redis

from core.errors import NotFound
from core.settings import Settings

P = "tb:"  # every registry key starts with this
LOCAL_OWNER = "local"  # owner of everything when TINKERBELL_AUTH=off
PENDING_FUTURES = P + "futures:pending"  # zset request_id -> created; done ones are pruned when read
PENDING_FUTURES_MAX = 100_000


def hash_key(api_key: str) -> str:
    return hashlib.sha256(api_key.encode()).hexdigest()


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


def _dumps_payload(value: Any) -> str:
    """JSON that keeps bytes (wire arrays in task kwargs) as {"__b64__": …}."""

    def default(obj: Any) -> Any:
        if isinstance(obj, (bytes, bytearray, memoryview)):
            return {"__b64__": base64.b64encode(bytes(obj)).decode()}
        raise TypeError(f"Object of type {type(obj).__name__} is not JSON serializable")

    return json.dumps(value, separators=(",", ":"), default=default)


def _loads_payload(raw: str) -> Any:
    return json.loads(raw, object_hook=lambda d: base64.b64decode(d["__b64__"]) if len(d) == 1 and "__b64__" in d else d)


def _load_hash(raw: dict[str, str]) -> dict[str, Any]:
    """Hash fields are JSON-encoded so types survive."""
    return {k: json.loads(v) for k, v in raw.items()}


# KEYS: ids hash (seq -> request id), admitted zset, pending hash (seq -> payload), next counter.
# ARGV: seq_id ("" = next after all admitted), request_id, payload.
# Returns {request id to answer with, first released seq, released payloads...}.
_ADMIT_LUA = """
local nxt = tonumber(redis.call('GET', KEYS[4]) or '1')
local seq = ARGV[1]
if seq == '' then
  local top = redis.call('ZREVRANGE', KEYS[2], 0, 0, 'WITHSCORES')
  local highest = 0
  if top[2] then highest = tonumber(top[2]) end
  seq = tostring(math.max(highest + 1, nxt))
end
local existing = redis.call('HGET', KEYS[1], seq)
if existing then return {existing, nxt} end
redis.call('HSET', KEYS[1], seq, ARGV[2])
redis.call('ZADD', KEYS[2], seq, seq)
redis.call('HSET', KEYS[3], seq, ARGV[3])
local out = {ARGV[2], nxt}
while true do
  local raw = redis.call('HGET', KEYS[3], tostring(nxt))
  if not raw then break end
  table.insert(out, raw)
  redis.call('HDEL', KEYS[3], tostring(nxt))
  nxt = nxt + 1
end
redis.call('SET', KEYS[4], nxt)
return out
"""


class Registry:
    """Thin typed access to the registry keys; one instance per process is enough (redis-py pools)."""

    def __init__(self, settings: Settings | None = None, client: redis.Redis | None = None) -> None:
        self.settings = settings or Settings.from_env()
        self.redis = client or redis.Redis.from_url(self.settings.registry_url, decode_responses=True, max_connections=256)

    # ---- generic hash records -------------------------------------------------------------
    def _put(self, key: str, record: dict[str, Any]) -> None:
        self.redis.hset(P + key, mapping={k: _dumps(v) for k, v in record.items()})

    def _get(self, key: str) -> dict[str, Any] | None:
        raw = self.redis.hgetall(P + key)
        return _load_hash(raw) if raw else None

    def _owned(self, kind: str, key: str, owner: str, what: str) -> dict[str, Any]:
        record = self._get(f"{kind}:{key}")
        if record is None or record.get("owner") != owner or record.get("deleted"):
            raise NotFound(f"{what}: no such {kind} '{key}'")
        return record

    # ---- API keys -------------------------------------------------------------------------
    def create_key(self, name: str, scopes: list[str] | None = None) -> str:
        """Make a new `tml-…` key; only its hash is stored. Returns the key (shown once)."""
        api_key = "tml-" + secrets.token_urlsafe(32)
        digest = hash_key(api_key)
        key_id = digest[:16]
        self._put(f"key:{digest}", {"key_id": key_id, "name": name, "scopes": sorted(scopes or []), "created": time.time()})
        self.redis.hset(P + "keys", key_id, digest)
        return api_key

    def lookup_key(self, api_key: str) -> dict[str, Any] | None:
        return self._get(f"key:{hash_key(api_key)}")

    def list_keys(self) -> list[dict[str, Any]]:
        return [r for d in self.redis.hvals(P + "keys") if (r := self._get(f"key:{d}"))]

    def revoke_key(self, key_id: str) -> bool:
        digest = self.redis.hget(P + "keys", key_id)
        if not digest:
            return False
        self.redis.delete(P + f"key:{digest}")
        self.redis.hdel(P + "keys", key_id)
        return True

    def grant_scope(self, key_id: str, scope: str) -> None:
        digest = self.redis.hget(P + "keys", key_id)
        record = self._get(f"key:{digest}") if digest else None
        if record is None:
            raise NotFound(f"key_id: no such key '{key_id}'")
        self._put(f"key:{digest}", {"scopes": sorted(set(record["scopes"]) | {scope})})

    # ---- sessions -------------------------------------------------------------------------
    def create_session(self, owner: str, tags: list[str] | None = None, user_metadata: dict | None = None) -> str:
        session_id = str(uuid.uuid4())
        now = time.time()
        self._put(f"session:{session_id}", {"owner": owner, "created": now, "heartbeat": now, "tags": tags or [], "user_metadata": user_metadata or {}, "status": "active"})
        self.redis.zadd(P + f"owner:{owner}:sessions", {session_id: now})
        return session_id

    def session(self, session_id: str, owner: str) -> dict[str, Any]:
        return self._owned("session", session_id, owner, "session_id")

    def touch_session(self, session_id: str, owner: str, **fields: Any) -> None:
        self.session(session_id, owner)
        self._put(f"session:{session_id}", {"heartbeat": time.time(), **fields})

    def list_sessions(self, owner: str, offset: int = 0, limit: int = 100) -> tuple[list[str], int]:
        key = P + f"owner:{owner}:sessions"
        return list(self.redis.zrevrange(key, offset, offset + limit - 1)), int(self.redis.zcard(key))

    def session_children(self, session_id: str, kind: str) -> list[str]:
        return list(self.redis.zrange(P + f"session:{session_id}:{kind}", 0, -1))

    # ---- models (adapters) ----------------------------------------------------------------
    def create_model(self, model_id: str, owner: str, session_id: str, base_model: str, lora: dict, worker: str, user_metadata: dict | None = None) -> bool:
        """Record a new adapter; False if model_id already exists (the create is then a re-send)."""
        now = time.time()
        if not self.redis.hsetnx(P + f"model:{model_id}", "owner", _dumps(owner)):
            return False
        self._put(f"model:{model_id}", {"session_id": session_id, "base_model": base_model, "lora": lora, "worker": worker, "created": now, "last_request_time": now, "user_metadata": user_metadata or {}, "status": "creating"})
        self.redis.zadd(P + f"owner:{owner}:models", {model_id: now})
        self.redis.zadd(P + f"session:{session_id}:models", {model_id: now})
        self.redis.sadd(P + f"worker:{worker}:adapters", model_id)
        self.redis.set(P + f"seq:{model_id}:next", 1)
        return True

    def model(self, model_id: str, owner: str) -> dict[str, Any]:
        return self._owned("model", model_id, owner, "model_id")

    def model_any(self, model_id: str) -> dict[str, Any] | None:
        """Worker-side lookup (no owner check: workers act for whoever the api/ already checked)."""
        return self._get(f"model:{model_id}")

    def update_model(self, model_id: str, **fields: Any) -> None:
        self._put(f"model:{model_id}", fields)

    def delete_model(self, model_id: str) -> None:
        record = self._get(f"model:{model_id}")
        if record is None:
            return
        self._put(f"model:{model_id}", {"deleted": True, "status": "removed"})
        self.redis.srem(P + f"worker:{record['worker']}:adapters", model_id)
        self.redis.zrem(P + f"owner:{record['owner']}:models", model_id)  # listings show live runs only

    def list_models(self, owner: str, offset: int = 0, limit: int = 100) -> tuple[list[str], int]:
        key = P + f"owner:{owner}:models"
        return list(self.redis.zrevrange(key, offset, offset + limit - 1)), int(self.redis.zcard(key))

    # ---- workers and placement ------------------------------------------------------------
    def register_worker(self, name: str, info: dict[str, Any], ttl_s: float) -> None:
        """Heartbeat: refreshes the worker's record and its liveness key."""
        self._put(f"worker:{name}", {**info, "name": name, "heartbeat": time.time()})
        self.redis.sadd(P + "workers", name)
        self.redis.set(P + f"worker:{name}:alive", "1", px=int(ttl_s * 1000))

    def unregister_worker(self, name: str) -> None:
        self.redis.delete(P + f"worker:{name}:alive")

    def live_workers(self) -> list[dict[str, Any]]:
        names = sorted(self.redis.smembers(P + "workers"))
        if not names:
            return []
        alive = self.redis.mget([P + f"worker:{n}:alive" for n in names])
        out = []
        for name, flag in zip(names, alive):
            if flag and (record := self._get(f"worker:{name}")):
                record["adapters"] = sorted(self.redis.smembers(P + f"worker:{name}:adapters"))
                out.append(record)
        return out

    def worker_adapters(self, name: str) -> list[str]:
        return sorted(self.redis.smembers(P + f"worker:{name}:adapters"))

    def pick_worker(self, base_model: str) -> str | None:
        """Fewest adapters among live workers serving base_model; else fewest among all live workers."""
        workers = self.live_workers()
        serving = [w for w in workers if base_model in w.get("base_models", [])] or workers
        if not serving:
            return None
        return min(serving, key=lambda w: (len(w["adapters"]), w["name"]))["name"]

    # ---- futures --------------------------------------------------------------------------
    def record_future(self, request_id: str, owner: str, kind: str, model_id: str | None = None, ttl_s: int = 7 * 86400) -> None:
        key = P + f"future:{request_id}"
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.hset(key, mapping={"owner": _dumps(owner), "kind": _dumps(kind), "model_id": _dumps(model_id), "created": _dumps(time.time())})
            pipe.expire(key, ttl_s)
            pipe.zadd(PENDING_FUTURES, {request_id: time.time()})  # api/ops.py settles it for /metrics
            pipe.zremrangebyrank(PENDING_FUTURES, 0, -PENDING_FUTURES_MAX - 1)  # bounded even if nobody scrapes
            pipe.execute()

    def future(self, request_id: str, owner: str) -> dict[str, Any]:
        return self._owned("future", request_id, owner, "request_id")

    # ---- per-model ordering (DESIGN rule 3) -----------------------------------------------
    def sequence(self, model_id: str, seq_id: int | None, request_id: str, payload: dict[str, Any]) -> tuple[str, list[dict[str, Any]]]:
        """Admit request `seq_id` of a model; return (request_id to answer with, payloads now ready to publish in order).

        A seq_id seen before answers with its first request id and publishes nothing (re-sends apply once).
        A seq_id ahead of the next expected waits here until the gap fills; then all contiguous ones are released.
        seq_id None means "next after everything admitted so far" (native clients that do not number).
        Callers must hold `seq_lock(model_id)` so releases are published in order.
        """
        base = P + f"seq:{model_id}"
        keys = [base + ":ids", base + ":admitted", base + ":pending", base + ":next"]
        answer = self._admit(keys=keys, args=["" if seq_id is None else str(seq_id), request_id, _dumps_payload(payload)])
        answer_id, first = answer[0], int(answer[1])
        released = [{**_loads_payload(raw), "seq_id": first + i} for i, raw in enumerate(answer[2:])]
        if answer_id == request_id and not released:  # held behind a gap: remember since when
            self.redis.hsetnx(base + ":held_since", "t", time.time())
        elif released:
            self.redis.delete(base + ":held_since")
        return answer_id, released

    def stalled_gap(self, model_id: str, older_than_s: float) -> list[int]:
        """seq_ids missing in front of requests held longer than older_than_s (empty when nothing is stalled)."""
        base = P + f"seq:{model_id}"
        since = self.redis.hget(base + ":held_since", "t")
        if since is None or time.time() - float(since) < older_than_s:
            return []
        held = [int(k) for k in self.redis.hkeys(base + ":pending")]
        if not held:
            return []
        nxt = int(self.redis.get(base + ":next") or 1)
        return list(range(nxt, min(held)))

    @property
    def _admit(self):
        """One round trip, atomic: record the seq_id (or find it was seen), then release the contiguous run."""
        if not hasattr(self, "_admit_script"):
            self._admit_script = self.redis.register_script(_ADMIT_LUA)
        return self._admit_script

    def seq_lock(self, model_id: str):
        return self.redis.lock(P + f"seq:{model_id}:lock", timeout=10, blocking_timeout=10)

    def waiting_seq_ids(self, model_id: str) -> list[int]:
        return sorted(int(s) for s in self.redis.hkeys(P + f"seq:{model_id}:pending"))

    def reset_sequence(self, model_id: str, next_seq: int = 1) -> None:
        self.redis.set(P + f"seq:{model_id}:next", next_seq)

    # ---- checkpoints ----------------------------------------------------------------------
    def add_checkpoint(self, model_id: str, checkpoint: dict[str, Any]) -> None:
        self.redis.hset(P + f"ckpt:{model_id}", checkpoint["checkpoint_id"], _dumps(checkpoint))

    def checkpoints(self, model_id: str) -> list[dict[str, Any]]:
        items = [json.loads(v) for v in self.redis.hvals(P + f"ckpt:{model_id}")]
        now = time.time()
        return sorted((c for c in items if not c.get("expires_at") or c["expires_at"] > now), key=lambda c: c["time"])

    def checkpoint(self, model_id: str, checkpoint_id: str) -> dict[str, Any] | None:
        raw = self.redis.hget(P + f"ckpt:{model_id}", checkpoint_id)
        return json.loads(raw) if raw else None

    def delete_checkpoint(self, model_id: str, checkpoint_id: str) -> None:
        self.redis.hdel(P + f"ckpt:{model_id}", checkpoint_id)

    # ---- samplers -------------------------------------------------------------------------
    def create_sampler(self, sampler_id: str, owner: str, session_id: str, base_model: str, model_path: str | None, adapter_dir: str | None) -> None:
        self._put(f"sampler:{sampler_id}", {"owner": owner, "session_id": session_id, "base_model": base_model, "model_path": model_path, "adapter_dir": adapter_dir, "created": time.time()})
        self.redis.zadd(P + f"session:{session_id}:samplers", {sampler_id: time.time()})

    def sampler(self, sampler_id: str, owner: str) -> dict[str, Any]:
        return self._owned("sampler", sampler_id, owner, "sampling_session_id")

    # ---- loss catalog (workers publish the built-ins; api/ reads it without importing torch) ----
    def publish_builtin_losses(self, catalog: list[dict[str, Any]]) -> None:
        self.redis.hset(P + "losses:builtin", mapping={c["name"]: _dumps(c) for c in catalog})

    def builtin_losses(self) -> list[dict[str, Any]]:
        return [json.loads(v) for v in self.redis.hvals(P + "losses:builtin")]

    def custom_losses(self, owner: str) -> list[dict[str, Any]]:
        """Latest version of each of the owner's custom losses (metadata only, not code)."""
        return [json.loads(v) for v in self.redis.hvals(P + f"losses:custom:{owner}")]

    def is_known_loss(self, name: str, owner: str) -> bool:
        """Unknown until a worker has published the catalog: then let the worker decide."""
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.exists(P + "losses:builtin")
            pipe.hexists(P + "losses:builtin", name)
            pipe.hexists(P + f"losses:custom:{owner}", name)
            catalog, builtin, custom = pipe.execute()
        return not catalog or bool(builtin or custom)

    # ---- counters for /metrics and the status page ----------------------------------------
    def incr_stat(self, name: str, amount: float = 1) -> None:
        self.redis.hincrbyfloat(P + "stats", name, amount)

    def stats(self) -> dict[str, float]:
        return {k: float(v) for k, v in self.redis.hgetall(P + "stats").items()}
