"""The registry in Redis: API keys (hashed), sessions, models and their placement, workers, checkpoints, futures.

Every object records its `owner` (the key id that made it); lookups with another owner answer NotFound,
so one key can never tell another key's objects from missing ones.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import time
import uuid
from dataclasses import dataclass
from typing import Any

import redis

from core.errors import Gone, NotFound, QuotaExceeded
from core.settings import Settings

P = "tb:"  # every registry key starts with this
LOCAL_OWNER = "local"  # owner of everything when TINKERBELL_AUTH=off
PENDING_FUTURES = P + "futures:pending"  # zset request_id -> created; done ones are pruned when read
PENDING_FUTURES_MAX = 100_000
FUTURE_TTL_S = 7 * 86400


def hash_key(api_key: str) -> str:
    """Keys are 256 random bits, so a plain SHA-256 is enough to store them (nothing to brute-force)."""
    return hashlib.sha256(api_key.encode()).hexdigest()


def queued_key(owner: str) -> str:
    """The owner's requests accepted and without a stored result (zset request_id -> admitted)."""
    return P + f"owner:{owner}:queued"


def checkpoint_bytes_key(owner: str) -> str:
    return P + f"owner:{owner}:ckpt_bytes"


def queue_full_error(settings: Settings, count: int) -> QuotaExceeded:
    return QuotaExceeded(
        f"TINKERBELL_MAX_QUEUED_REQUESTS_PER_KEY: this API key has {count} requests queued or running, the limit is "
        f"{settings.max_queued_requests_per_key}; send more when some have finished",
        status=429,
        retry_after_s=1,
    )


def checkpoint_bytes_error(settings: Settings, stored: int, adding: int | None = None) -> QuotaExceeded:
    more = f" and this one is {adding} bytes" if adding else ""
    return QuotaExceeded(
        f"TINKERBELL_MAX_CHECKPOINT_BYTES_PER_KEY: this API key stores {stored} bytes of checkpoints{more}, the limit "
        f"is {settings.max_checkpoint_bytes_per_key}; delete checkpoints (or set a ttl) before saving more"
    )


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


def _load_hash(raw: dict[str, str]) -> dict[str, Any]:
    """Hash fields are JSON-encoded so types survive."""
    return {k: json.loads(v) for k, v in raw.items()}


# Records a future for /retrieve_future (owner, kind and model_id are JSON) and lists it as pending for /metrics,
# keeping that list bounded even if nobody scrapes. Prepended to the scripts that create requests.
# With a queued-requests limit, the request is also listed in its owner's queued set (queued_key) until a worker has
# stored its result: the per-key count of requests queued or running is that set's ZCARD (without a limit nothing
# is listed, so nothing can pile up there). queue_full answers that count when the set is at
# the limit (0: none), and lets an `exempt` request in up to twice the limit (one that fills a seq_id gap, which
# the requests held behind it wait for).
_FUTURE_LUA = """
local function record_future(key, pending, request_id, owner, kind, model_id, now, ttl, cap, queued, limit)
  redis.call('HSET', key, 'owner', owner, 'kind', kind, 'model_id', model_id, 'created', now)
  redis.call('EXPIRE', key, ttl)
  redis.call('ZADD', pending, now, request_id)
  redis.call('ZREMRANGEBYRANK', pending, 0, -tonumber(cap) - 1)
  if tonumber(limit) > 0 then redis.call('ZADD', queued, now, request_id) end
end
local function queue_full(queued, limit, exempt)
  limit = tonumber(limit)
  if limit <= 0 then return false end
  local n = redis.call('ZCARD', queued)
  if n < limit or (exempt and n < 2 * limit) then return false end
  return n
end
"""

# Requests admitted but not yet known to be on the broker: api/ publishes each with Celery's send_task, then marks
# it published; one left here past OUTBOX_GRACE_S (the API died between the two) is published again by a sweep.
OUTBOX = P + "outbox"  # hash request_id -> JSON [queue, message]
OUTBOX_DUE = P + "outbox:due"  # zset request_id -> when it became ready (or was last claimed by a sweep)
OUTBOX_GRACE_S = 10.0
# A published adapter request's message is kept (a key per request, sent:<request_id> -> JSON [queue, message,
# published at]) until its result is stored (finish_request), so one that Redis handed to a worker's BRPOP and the
# worker never received (Redis restarted between the two, before kombu's unacked record) can be published again
# (api.service.Service.recover_lost).
SENT = P + "sent:"
SENT_TTL_S = 7 * 86400  # as long as results are kept (result_expires)

# Lua: move the run of held requests from seq_id nxt on (while each next one is held) from the pending hash into
# the outbox, appending request id, message to out ('' as the message of own: its caller has it); returns the
# seq_id after the run. Shared by _SUBMIT_LUA and _RELEASE_GAP_LUA.
_RELEASE_RUN_LUA = """
local function release_run(ids, pending, outbox, due, queue, now, nxt, own, out)
  while true do
    local raw = redis.call('HGET', pending, tostring(nxt))
    if not raw then return nxt end
    redis.call('HDEL', pending, tostring(nxt))
    if raw ~= '' then
      local request_id = redis.call('HGET', ids, tostring(nxt))
      redis.call('HSET', outbox, request_id, cjson.encode({queue, raw}))
      redis.call('ZADD', due, now, request_id)
      table.insert(out, request_id)
      if request_id == own then table.insert(out, '') else table.insert(out, raw) end
    end
    nxt = nxt + 1
  end
end
"""

# Admission of one request of a model, in one atomic script: nothing is released out of seq_id order, and every
# request it releases goes into the outbox before the script returns, so no crash can lose one.
# KEYS: 1 ids hash (seq -> request id), 2 admitted zset, 3 pending hash (seq -> message; '' = nothing to run),
#       4 next seq counter, 5 held-since hash, 6 the future's hash, 7 pending-futures zset, 8 the outbox hash,
#       9 the outbox's due zset, 10 the model's record.
#       11 the owner's queued set.
# ARGV: 1 seq_id, 2 request id, 3 message, 4 queue, 5 now, 6 the owner the model must have (JSON; '' = no check),
#       7 the future's kind (JSON; '' = record no future), 8 model_id (JSON), 9 future ttl seconds,
#       10 pending-futures cap, 11 the owner's queued-requests limit (0: none).
# Returns {request id to answer with, status, parked, then request id and message of each request now ready, in
# seq_id order (the message is '' for this call's own request: the caller has it)}; status 1: admitted, 0: a seq_id
# seen before (it answers with its first id), -1: the model is not the owner's (or was removed), -2: its session
# was finished, 2: a seq_id below the next expected that was never admitted: a gap the model stopped waiting for
# (_RELEASE_GAP_LUA), answered 'expired-<request id>', 3: the owner's queued-requests limit is reached (then the
# count follows instead of parked; nothing recorded). parked: 1 when no worker holds the model (place it).
_SUBMIT_LUA = (
    _FUTURE_LUA
    + _RELEASE_RUN_LUA
    + """
local model = redis.call('HMGET', KEYS[10], 'owner', 'deleted', 'finished', 'status')
if ARGV[6] ~= '' then
  if model[1] ~= ARGV[6] or model[2] == 'true' then return {'', -1} end
  if model[3] == 'true' then return {'', -2} end
end
local parked = 0
if model[4] == '"parked"' then parked = 1 end
local seq = ARGV[1]
local existing = redis.call('HGET', KEYS[1], seq)
if existing then return {existing, 0, parked} end
if tonumber(seq) < tonumber(redis.call('GET', KEYS[4]) or '1') then return {'expired-' .. ARGV[2], 2, parked} end
if ARGV[7] ~= '' then
  local top = redis.call('ZREVRANGE', KEYS[2], 0, 0, 'WITHSCORES')
  local full = queue_full(KEYS[11], ARGV[11], top[2] ~= nil and tonumber(seq) < tonumber(top[2]))
  if full then return {'', 3, full} end
end
redis.call('HSET', KEYS[1], seq, ARGV[2])
redis.call('ZADD', KEYS[2], seq, seq)
if ARGV[7] ~= '' then
  record_future(KEYS[6], KEYS[7], ARGV[2], ARGV[6], ARGV[7], ARGV[8], ARGV[5], ARGV[9], ARGV[10], KEYS[11], ARGV[11])
end
redis.call('HSET', KEYS[3], seq, ARGV[3])
local first = tonumber(redis.call('GET', KEYS[4]) or '1')
local out = {ARGV[2], 1, parked}
local nxt = release_run(KEYS[1], KEYS[3], KEYS[8], KEYS[9], ARGV[4], ARGV[5], first, ARGV[2], out)
redis.call('SET', KEYS[4], nxt)
if nxt > first then redis.call('DEL', KEYS[5]) else redis.call('HSETNX', KEYS[5], 't', ARGV[5]) end
return out
"""
)

# Give up on a model's missing seq_ids: when requests have been held longer than a cutoff, the next expected seq_id
# jumps to the first held one (whatever the gap's size: nothing is written per missing id; one that comes later is
# answered as expired by _SUBMIT_LUA) and the held run behind it is released into the outbox, in seq_id order.
# KEYS: 1 ids hash, 2 admitted zset, 3 pending hash, 4 next seq counter, 5 held-since hash, 6 outbox, 7 its due zset.
# ARGV: 1 cutoff (held since before it: stalled), 2 now, 3 queue. Returns request id, message, ... of those released.
_RELEASE_GAP_LUA = (
    _RELEASE_RUN_LUA
    + """
local since = redis.call('HGET', KEYS[5], 't')
if not since or tonumber(since) > tonumber(ARGV[1]) then return {} end
local first = redis.call('ZRANGEBYSCORE', KEYS[2], redis.call('GET', KEYS[4]) or '1', '+inf', 'LIMIT', 0, 1)
if not first[1] then
  redis.call('DEL', KEYS[5])
  return {}
end
local out = {}
local nxt = release_run(KEYS[1], KEYS[3], KEYS[6], KEYS[7], ARGV[3], ARGV[2], tonumber(first[1]), nil, out)
redis.call('SET', KEYS[4], nxt)
if redis.call('HLEN', KEYS[3]) > 0 then redis.call('HSET', KEYS[5], 't', ARGV[2]) else redis.call('DEL', KEYS[5]) end
return out
"""
)

# A request that needs no ordering (create an adapter, sample): record its future and put it in the outbox.
# KEYS: 1 the future's hash, 2 pending-futures zset, 3 the outbox hash, 4 the outbox's due zset, 5 the owner's
# queued set. ARGV: 1 queue, 2 message, 3 request id, 4-6 owner/kind/model_id (JSON), 7 now, 8 ttl, 9 cap,
# 10 the owner's queued-requests limit (0: none). Returns {1}, or {0, count} when the limit is reached.
_PUSH_LUA = (
    _FUTURE_LUA
    + """
local full = queue_full(KEYS[5], ARGV[10], false)
if full then return {0, full} end
record_future(KEYS[1], KEYS[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6], ARGV[7], ARGV[8], ARGV[9], KEYS[5], ARGV[10])
redis.call('HSET', KEYS[3], ARGV[3], cjson.encode({ARGV[1], ARGV[2]}))
redis.call('ZADD', KEYS[4], ARGV[7], ARGV[3])
return {1}
"""
)

# A worker stored a request's result: it is no longer pending, nor queued for its owner. Idempotent.
# KEYS: 1 the future's hash, 2 pending-futures zset. ARGV: 1 request id, 2 the registry prefix.
_FINISH_LUA = """
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('DEL', ARGV[2] .. 'sent:' .. ARGV[1])
local owner = redis.call('HGET', KEYS[1], 'owner')
if owner then redis.call('ZREM', ARGV[2] .. 'owner:' .. cjson.decode(owner) .. ':queued', ARGV[1]) end
return 1
"""

# A new adapter, within its owner's limit on live adapters (their owner:<owner>:models zset, which delete_model
# leaves). KEYS: 1 the model's record, 2 the owner's models zset. ARGV: 1 owner (JSON), 2 model_id, 3 now,
# 4 limit (0: none). Returns {1} created, {0} exists already (a re-send), {-1, count} at the limit.
_CREATE_MODEL_LUA = """
if redis.call('HEXISTS', KEYS[1], 'owner') == 1 then return {0} end
local limit = tonumber(ARGV[4])
if limit > 0 then
  local n = redis.call('ZCARD', KEYS[2])
  if n >= limit then return {-1, n} end
end
redis.call('HSET', KEYS[1], 'owner', ARGV[1])
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[2])
return {1}
"""

# Checkpoint records and their owners' stored bytes (owner:<owner>:ckpt_bytes), changed together. A record replaced
# under the same id gives back its old size first. KEYS: 1 the model's checkpoint hash, 2 the expiry index, 3 the new
# record owner's bytes counter. ARGV: 1 checkpoint_id, 2 record JSON, 3 expiry member, 4 expires_at ('' = none),
# 5 size, 6 limit in bytes (0: no check), 7 the registry prefix. Returns {1, bytes stored now}, or {-1, bytes stored}
# when the record would take the owner past the limit (nothing written).
_ADD_CHECKPOINT_LUA = """
local size = tonumber(ARGV[5])
local old = redis.call('HGET', KEYS[1], ARGV[1])
local old_size, old_key = 0, nil
if old then
  local record = cjson.decode(old)
  if type(record.owner) == 'string' and tonumber(record.size_bytes) then
    old_size, old_key = tonumber(record.size_bytes), ARGV[7] .. 'owner:' .. record.owner .. ':ckpt_bytes'
  end
end
local stored = tonumber(redis.call('GET', KEYS[3]) or '0')
local limit = tonumber(ARGV[6])
if limit > 0 and size > 0 then
  local after = stored + size
  if old_key == KEYS[3] then after = after - old_size end
  if after > limit then return {-1, stored} end
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
if ARGV[4] ~= '' then redis.call('ZADD', KEYS[2], ARGV[4], ARGV[3]) else redis.call('ZREM', KEYS[2], ARGV[3]) end
if old_key and redis.call('DECRBY', old_key, old_size) < 0 then redis.call('SET', old_key, 0) end
if size > 0 then redis.call('INCRBY', KEYS[3], size) end
return {1, tonumber(redis.call('GET', KEYS[3]) or '0')}
"""

# KEYS: 1 the model's checkpoint hash, 2 the expiry index. ARGV: 1 checkpoint_id, 2 expiry member, 3 prefix.
_DELETE_CHECKPOINT_LUA = """
local old = redis.call('HGET', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[2])
if old then
  local record = cjson.decode(old)
  if type(record.owner) == 'string' and tonumber(record.size_bytes) then
    local key = ARGV[3] .. 'owner:' .. record.owner .. ':ckpt_bytes'
    -- a record from before the count existed was never added: never below 0
    if redis.call('DECRBY', key, tonumber(record.size_bytes)) < 0 then redis.call('SET', key, 0) end
  end
end
return 1
"""

# The outbox entries that became ready before a cutoff, claimed (their time set to now, so that another API
# process sweeping at the same moment does not take them too). KEYS: 1 outbox hash, 2 due zset.
# ARGV: 1 cutoff, 2 now, 3 most to claim. Returns request id, [queue, message] JSON, request id, ...
_CLAIM_LUA = """
local out = {}
for _, request_id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[3]))) do
  local entry = redis.call('HGET', KEYS[1], request_id)
  if entry then
    redis.call('ZADD', KEYS[2], ARGV[2], request_id)
    table.insert(out, request_id)
    table.insert(out, entry)
  else
    redis.call('ZREM', KEYS[2], request_id)
  end
end
return out
"""

# The seq_id for a request that brings none: next after everything admitted or handed out so far.
# KEYS: 1 admitted zset, 2 next seq counter, 3 last handed-out counter, 4 the model's record.
# ARGV: 1 the owner the model must have (JSON). Returns -1 when the model is not the owner's.
_RESERVE_LUA = """
local model = redis.call('HMGET', KEYS[4], 'owner', 'deleted')
if model[1] ~= ARGV[1] or model[2] == 'true' then return -1 end
local top = redis.call('ZREVRANGE', KEYS[1], 0, 0, 'WITHSCORES')
local highest = 0
if top[2] then highest = tonumber(top[2]) end
local seq = math.max(highest + 1, tonumber(redis.call('GET', KEYS[2]) or '1'),
  tonumber(redis.call('GET', KEYS[3]) or '0') + 1)
redis.call('SET', KEYS[3], seq)
return seq
"""


# ---- placement (who holds an adapter), fenced by an epoch -----------------------------------------------------
# A model's record holds `worker` (its owner, JSON; "" while parked) and `epoch` (a plain integer, raised each time it
# is placed anew or taken from a dead worker). A worker writes for an adapter only while the record still names it
# with the epoch it was given, so an old owner that comes back never overwrites the new one's state.
PARKED = P + "models:parked"  # set of model ids held by no worker: restored from their autosave on next placement
_NOT_RUN_LUA = "string.sub(rid, 1, 8) == 'refused-' or string.sub(rid, 1, 8) == 'expired-'"

# A worker parks its adapter: only while it holds it (worker and epoch match) and every admitted request of it has
# run (seq_ids above applied_seq are only refused/expired ones), so no admitted request is left behind; a request
# admitted later sees the model parked and places it again. KEYS: 1 model record, 2 the worker's adapters set,
# 3 parked set, 4 admitted zset, 5 ids hash. ARGV: 1 worker (JSON), 2 epoch, 3 applied_seq, 4 now, 5 model_id,
# 6 why (JSON).
# Returns 1 parked, 0 requests still to run, -1 not this worker's (any more).
_PARK_LUA = f"""
local m = redis.call('HMGET', KEYS[1], 'worker', 'epoch', 'deleted', 'applied_seq')
if m[1] ~= ARGV[1] or tonumber(m[2] or '0') ~= tonumber(ARGV[2]) or m[3] == 'true' then return -1 end
for _, seq in ipairs(redis.call('ZRANGEBYSCORE', KEYS[4], '(' .. ARGV[3], '+inf')) do
  local rid = redis.call('HGET', KEYS[5], seq)
  if rid and not ({_NOT_RUN_LUA}) then return 0 end
end
local applied = math.max(tonumber(ARGV[3]), tonumber(m[4] or '0') or 0)
redis.call('HSET', KEYS[1], 'worker', '""', 'status', '"parked"', 'parked_at', ARGV[4], 'applied_seq', applied,
  'parked_reason', ARGV[6])
redis.call('SREM', KEYS[2], ARGV[5])
redis.call('SADD', KEYS[3], ARGV[5])
return 1
"""

# Place a parked model on a worker: epoch + 1, status restoring. KEYS: 1 model record, 2 parked set, 3 the worker's
# adapters set. ARGV: 1 worker (JSON), 2 model_id, 3 now. Returns the new epoch, or 0 when it was not parked (another
# caller placed it first, or it was removed).
_PLACE_LUA = """
local m = redis.call('HMGET', KEYS[1], 'status', 'deleted')
if m[1] ~= '"parked"' or m[2] == 'true' then return 0 end
local epoch = redis.call('HINCRBY', KEYS[1], 'epoch', 1)
redis.call('HSET', KEYS[1], 'worker', ARGV[1], 'status', '"restoring"', 'placed_at', ARGV[3])
redis.call('SREM', KEYS[2], ARGV[2])
redis.call('SADD', KEYS[3], ARGV[2])
return epoch
"""

# Take a model from a dead worker: epoch + 1 (fencing the old owner out), parked, noting whom it was taken from
# (its unacked messages are then put back by the new owner). KEYS: 1 model record, 2 the dead worker's adapters set,
# 3 parked set. ARGV: 1 dead worker (JSON), 2 model_id, 3 now. Returns 1 taken, 0 not that worker's.
_TAKE_OVER_LUA = """
redis.call('SREM', KEYS[2], ARGV[2])
local m = redis.call('HMGET', KEYS[1], 'worker', 'deleted')
if m[1] ~= ARGV[1] or m[2] == 'true' then return 0 end
redis.call('HINCRBY', KEYS[1], 'epoch', 1)
redis.call('HSET', KEYS[1], 'worker', '""', 'status', '"parked"', 'parked_at', ARGV[3], 'taken_from', ARGV[1],
  'parked_reason', '"worker died"')
redis.call('SADD', KEYS[3], ARGV[2])
return 1
"""

# Set a model's fields only while the record names this worker with this epoch. KEYS: 1 model record.
# ARGV: 1 worker (JSON), 2 epoch, then field, JSON value, ... Returns 1 written, 0 fenced out.
_FENCED_SET_LUA = """
local m = redis.call('HMGET', KEYS[1], 'worker', 'epoch')
if m[1] ~= ARGV[1] or tonumber(m[2] or '0') ~= tonumber(ARGV[2]) then return 0 end
if #ARGV > 2 then redis.call('HSET', KEYS[1], unpack(ARGV, 3)) end
return 1
"""


@dataclass(frozen=True)
class Placement:
    """Who holds a model now: worker ("" while parked), epoch, status (creating/ready/parked/restoring/removed)."""

    worker: str
    epoch: int
    status: str
    finished: bool = False
    deleted: bool = False


@dataclass(frozen=True)
class Outgoing:
    """A request to publish: its id (the Celery task id), its queue, and the message api/ made for it."""

    request_id: str
    queue: str
    message: str


class Ready(list):
    """The requests a submit made ready (Outgoing, in seq_id order); `parked`: no worker holds the model now, so the
    caller places it (they wait on its queue until the new owner consumes it)."""

    parked: bool = False


def _check_owned(record: dict[str, Any] | None, kind: str, key: str, owner: str, what: str) -> dict[str, Any]:
    if record is None or record.get("owner") != owner or record.get("deleted"):
        raise NotFound(f"{what}: no such {kind} '{key}'")
    return record


def riding_out_restarts(settings: Settings) -> dict[str, Any]:
    """redis-py client options that carry a command over a Redis restart (up to settings.redis_outage_s): retry on
    connection errors with a backoff capped at 1 s, and a ping on a connection idle 5 s before reusing it."""
    from redis.backoff import ExponentialBackoff
    from redis.retry import Retry

    retries = max(1, int(settings.redis_outage_s))
    return {
        "retry": Retry(ExponentialBackoff(cap=1.0, base=0.05), retries),
        "retry_on_error": [redis.ConnectionError, redis.TimeoutError],
        "health_check_interval": 5,
        "socket_keepalive": True,
    }


class Registry:
    """Thin typed access to the registry keys; one instance per process is enough (redis-py pools)."""

    def __init__(self, settings: Settings | None = None, client: redis.Redis | None = None) -> None:
        self.settings = settings or Settings.from_env()
        self.redis = client or redis.Redis.from_url(
            self.settings.registry_url, decode_responses=True, max_connections=256, **riding_out_restarts(self.settings)
        )
        self._probe: redis.Redis | None = None

    def reachable(self, timeout_s: float = 1.0) -> bool:
        """One PING that does not wait out an outage (this registry's own client retries for
        TINKERBELL_REDIS_OUTAGE_S): /healthz and /metrics ask it first, so they answer at once while Redis is down."""
        if self._probe is None:
            from redis.backoff import NoBackoff
            from redis.retry import Retry

            self._probe = redis.Redis.from_url(
                self.settings.registry_url,
                socket_timeout=timeout_s,
                socket_connect_timeout=timeout_s,
                retry=Retry(NoBackoff(), 0),
            )
        try:
            return bool(self._probe.ping())
        except redis.RedisError:
            return False

    # ---- generic hash records -------------------------------------------------------------
    def _put(self, key: str, record: dict[str, Any]) -> None:
        self.redis.hset(P + key, mapping={k: _dumps(v) for k, v in record.items()})

    def _get(self, key: str) -> dict[str, Any] | None:
        raw = self.redis.hgetall(P + key)
        return _load_hash(raw) if raw else None

    def _owned(self, kind: str, key: str, owner: str, what: str) -> dict[str, Any]:
        return _check_owned(self._get(f"{kind}:{key}"), kind, key, owner, what)

    # ---- API keys -------------------------------------------------------------------------
    def create_key(self, name: str, scopes: list[str] | None = None) -> str:
        """Make a new `tml-…` key; only its hash is stored. Returns the key (shown once)."""
        api_key = "tml-" + secrets.token_urlsafe(32)
        digest = hash_key(api_key)
        key_id = digest[:16]
        self._put(
            f"key:{digest}", {"key_id": key_id, "name": name, "scopes": sorted(scopes or []), "created": time.time()}
        )
        self.redis.hset(P + "keys", key_id, digest)
        return api_key

    def lookup_key(self, api_key: str) -> dict[str, Any] | None:
        """The key's record, found by the SHA-256 of the presented key (never the key itself: Redis's lookup time
        depends only on a digest the caller cannot steer), then checked in constant time (hmac.compare_digest)
        against the key id derived from that digest when the key was made."""
        digest = hash_key(api_key)
        record = self._get(f"key:{digest}")
        if record is None or not hmac.compare_digest(str(record.get("key_id", "")), digest[:16]):
            return None
        return record

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
        self._put(
            f"session:{session_id}",
            {
                "owner": owner,
                "created": now,
                "heartbeat": now,
                "tags": tags or [],
                "user_metadata": user_metadata or {},
                "status": "active",
            },
        )
        self.redis.zadd(P + f"owner:{owner}:sessions", {session_id: now})
        return session_id

    def session(self, session_id: str, owner: str) -> dict[str, Any]:
        return self._owned("session", session_id, owner, "session_id")

    def touch_session(self, session_id: str, owner: str, **fields: Any) -> None:
        self.session(session_id, owner)
        self._put(f"session:{session_id}", {"heartbeat": time.time(), **fields})

    def live_session(self, session_id: str, owner: str) -> dict[str, Any]:
        """The owner's session; Gone once it was finished (ServiceClient.close)."""
        session = self.session(session_id, owner)
        if str(session.get("status", "")).startswith("finished"):
            raise Gone(
                f"session_id: session {session_id} was finished ({session['status'].split(':', 1)[-1]}); it takes no "
                "new requests: start a new ServiceClient"
            )
        return session

    def finish_session(self, session_id: str, owner: str, status: str) -> list[str]:
        """End a session (the first finish reason stands): its models take no new requests. Returns its model ids."""
        session = self.session(session_id, owner)
        if not str(session.get("status", "")).startswith("finished"):
            self._put(f"session:{session_id}", {"status": f"finished:{status}", "finished_at": time.time()})
        model_ids = self.session_children(session_id, "models")
        if model_ids:
            with self.redis.pipeline(transaction=False) as pipe:
                for model_id in model_ids:
                    pipe.hset(P + f"model:{model_id}", "finished", "true")
                pipe.execute()
        return model_ids

    def list_sessions(self, owner: str, offset: int = 0, limit: int = 100) -> tuple[list[str], int]:
        key = P + f"owner:{owner}:sessions"
        return list(self.redis.zrevrange(key, offset, offset + limit - 1)), int(self.redis.zcard(key))

    def session_children(self, session_id: str, kind: str) -> list[str]:
        return list(self.redis.zrange(P + f"session:{session_id}:{kind}", 0, -1))

    # ---- models (adapters) ----------------------------------------------------------------
    def create_model(
        self,
        model_id: str,
        owner: str,
        session_id: str,
        base_model: str,
        lora: dict,
        worker: str,
        user_metadata: dict | None = None,
    ) -> bool:
        """Record a new adapter; False if model_id already exists (the create is then a re-send).

        QuotaExceeded (403) when the owner already holds TINKERBELL_MAX_ADAPTERS_PER_KEY live adapters."""
        now = time.time()
        limit = self.settings.max_adapters_per_key
        created, *count = self._script("_create_model", _CREATE_MODEL_LUA)(
            keys=[P + f"model:{model_id}", P + f"owner:{owner}:models"], args=[_dumps(owner), model_id, now, limit]
        )
        if created == 0:
            return False
        if created < 0:
            raise QuotaExceeded(
                f"TINKERBELL_MAX_ADAPTERS_PER_KEY: this API key holds {count[0]} live adapters, the limit is {limit}; "
                "remove one (training_client / remove_lora) before creating another"
            )
        self._put(
            f"model:{model_id}",
            {
                "session_id": session_id,
                "base_model": base_model,
                "lora": lora,
                "worker": worker,
                "created": now,
                "last_request_time": now,
                "user_metadata": user_metadata or {},
                "status": "creating",
                "epoch": 1,
            },
        )
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
        self.redis.srem(PARKED, model_id)
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
        """Fewest adapters among live training workers serving base_model; else fewest among all training workers.
        A worker without a recorded role (older version) trains."""
        workers = [w for w in self.live_workers() if "train" in str(w.get("role", "train"))]
        serving = [w for w in workers if base_model in w.get("base_models", [])] or workers
        if not serving:
            return None
        return min(serving, key=lambda w: (len(w["adapters"]), w["name"]))["name"]

    # ---- placement: parking, placing, taking over from dead workers, fenced writes ----------
    def placement(self, model_id: str) -> Placement | None:
        worker, epoch, status, finished, deleted = self.redis.hmget(
            P + f"model:{model_id}", ["worker", "epoch", "status", "finished", "deleted"]
        )
        if worker is None:
            return None
        return Placement(
            json.loads(worker),
            int(epoch or 0),
            json.loads(status) if status else "",
            finished == "true",
            deleted == "true",
        )

    def placement_status(self, model_id: str) -> str:
        """The model's status alone, in one round trip ("parked": no worker holds it)."""
        raw = self.redis.hget(P + f"model:{model_id}", "status")
        return json.loads(raw) if raw else ""

    def park(self, model_id: str, worker: str, epoch: int, applied_seq: int, reason: str = "") -> int:
        """The worker gives up an adapter it holds with nothing admitted left to run (_PARK_LUA): 1 parked, 0 requests
        still to run, -1 not this worker's (any more)."""
        base = P + f"seq:{model_id}"
        keys = [P + f"model:{model_id}", P + f"worker:{worker}:adapters", PARKED, base + ":admitted", base + ":ids"]
        args = [_dumps(worker), epoch, applied_seq, time.time(), model_id, _dumps(reason)]
        return int(self._script("_park_lua", _PARK_LUA)(keys=keys, args=args))

    def place(self, model_id: str, worker: str) -> int:
        """Give a parked model to a worker: the epoch it holds it with, or 0 when it was not parked."""
        keys = [P + f"model:{model_id}", PARKED, P + f"worker:{worker}:adapters"]
        return int(self._script("_place_lua", _PLACE_LUA)(keys=keys, args=[_dumps(worker), model_id, time.time()]))

    def take_over(self, model_id: str, dead_worker: str) -> bool:
        """Take a model from a dead worker (epoch + 1, parked): True if it was that worker's."""
        keys = [P + f"model:{model_id}", P + f"worker:{dead_worker}:adapters", PARKED]
        args = [_dumps(dead_worker), model_id, time.time()]
        return bool(self._script("_take_over_lua", _TAKE_OVER_LUA)(keys=keys, args=args))

    def dead_workers(self, dead_s: float) -> list[str]:
        """Workers that hold adapters and whose heartbeat is missed longer than dead_s."""
        names = sorted(self.redis.smembers(P + "workers"))
        if not names:
            return []
        with self.redis.pipeline(transaction=False) as pipe:
            for name in names:
                pipe.exists(P + f"worker:{name}:alive")
                pipe.hget(P + f"worker:{name}", "heartbeat")
                pipe.scard(P + f"worker:{name}:adapters")
            flat = pipe.execute()
        cutoff = time.time() - dead_s
        dead = []
        for name, alive, beat, adapters in zip(names, flat[::3], flat[1::3], flat[2::3]):
            if not alive and adapters and float(json.loads(beat) if beat else 0) < cutoff:
                dead.append(name)
        return dead

    def idle_models(self, model_ids: list[str], idle_s: float) -> dict[str, str]:
        """Of these models (ready ones only), those whose session was finished, or has had no heartbeat and the model
        no request for idle_s seconds (a model without a session record is never idle): model_id -> "session
        finished" or "session idle"."""
        if not model_ids:
            return {}
        with self.redis.pipeline(transaction=False) as pipe:
            for model_id in model_ids:
                pipe.hmget(P + f"model:{model_id}", ["session_id", "last_request_time", "status"])
            models = pipe.execute()
        with self.redis.pipeline(transaction=False) as pipe:
            for session_id, _, _ in models:
                pipe.hmget(P + f"session:{json.loads(session_id) if session_id else ''}", ["heartbeat", "status"])
            sessions = pipe.execute()
        cutoff = time.time() - idle_s
        idle = {}
        for model_id, (_, last_request, model_status), (heartbeat, status) in zip(model_ids, models, sessions):
            if heartbeat is None or model_status != '"ready"':  # being created or restored: not idle yet
                continue
            if str(json.loads(status) if status else "").startswith("finished"):
                idle[model_id] = "session finished"
            elif max(float(json.loads(heartbeat)), float(json.loads(last_request or "0"))) < cutoff:
                idle[model_id] = "session idle"
        return idle

    def parked_count(self) -> int:
        """Adapters no worker holds now (their state is in their autosave)."""
        return int(self.redis.scard(PARKED))

    def update_owned(self, model_id: str, worker: str, epoch: int, **fields: Any) -> bool:
        """Write a model's fields only while `worker` holds it with `epoch` (an old owner is fenced out)."""
        return bool(self._fenced_set(model_id, worker, epoch, fields))

    def _fenced_set(self, model_id: str, worker: str, epoch: int, fields: dict[str, Any], client: Any = None) -> Any:
        flat = [item for k, v in fields.items() for item in (k, _dumps(v))]
        script = self._script("_fenced_set_lua", _FENCED_SET_LUA)
        return script(keys=[P + f"model:{model_id}"], args=[_dumps(worker), epoch, *flat], client=client)

    # ---- futures --------------------------------------------------------------------------
    def future(self, request_id: str, owner: str) -> dict[str, Any]:
        return self._owned("future", request_id, owner, "request_id")

    def record_future(self, request_id: str, owner: str, kind: str) -> None:
        """The future of an answer api/ makes itself (create_custom_loss), whose result the caller stores."""
        self._put(f"future:{request_id}", {"owner": owner, "kind": kind, "model_id": None, "created": time.time()})
        self.redis.expire(P + f"future:{request_id}", FUTURE_TTL_S)

    # ---- per-model ordering (DESIGN rule 3) -----------------------------------------------
    def submit(
        self,
        model_id: str,
        seq_id: int,
        request_id: str,
        message: str,
        queue: str,
        owner: str | None,
        kind: str | None = None,
    ) -> tuple[str, Ready]:
        """Admit request `seq_id` of a model; returns the request id to answer with and the requests now ready.

        The answer is `request_id`, or the first one's if this seq_id was seen before (a re-send applies once).
        A seq_id ahead of the next expected waits here until the gap fills. The ready requests (this one and any
        it released, in seq_id order) are in the outbox: publish each, then `mark_published`; when `ready.parked`,
        place the model too. Gone when the model's session was finished.
        message: what api/ publishes for the request, or "" for a seq_id that runs nothing.
        owner: NotFound unless the model is this owner's (None: no check, for the service's own bookkeeping).
        kind: record the newly admitted request's future, of this kind, for the owner; QuotaExceeded (429) when the
        owner has TINKERBELL_MAX_QUEUED_REQUESTS_PER_KEY requests without a result (one that fills a gap its model's
        held requests wait for may go up to twice that).
        """
        base = P + f"seq:{model_id}"
        keys = [
            base + ":ids",
            base + ":admitted",
            base + ":pending",
            base + ":next",
            base + ":held_since",
            P + f"future:{request_id}",
            PENDING_FUTURES,
            OUTBOX,
            OUTBOX_DUE,
            P + f"model:{model_id}",
        ]
        args = [
            str(seq_id),
            request_id,
            message,
            queue,
            time.time(),
            "" if owner is None else _dumps(owner),
            "" if kind is None else _dumps(kind),
            _dumps(model_id),
            FUTURE_TTL_S,
            PENDING_FUTURES_MAX,
            self.settings.max_queued_requests_per_key if owner is not None else 0,
        ]
        keys.append(queued_key(owner if owner is not None else LOCAL_OWNER))
        answer_id, status, *rest = self._script("_submit", _SUBMIT_LUA)(keys=keys, args=args)
        if status == -1:
            raise NotFound(f"model_id: no such model '{model_id}'")
        if status == -2:
            raise Gone(
                f"model_id: the session of {model_id} was finished (ServiceClient.close); it takes no new requests. "
                "Start a new ServiceClient, and create_training_client_from_state to go on from a checkpoint"
            )
        if status == 3:
            raise queue_full_error(self.settings, int(rest[0]))
        parked, ready = rest[0], rest[1:]
        out = Ready(Outgoing(rid, queue, raw or message) for rid, raw in zip(ready[::2], ready[1::2]))
        out.parked = bool(parked)
        return answer_id, out

    def push(
        self,
        queue: str,
        message: str,
        request_id: str,
        owner: str,
        kind: str,
        model_id: str | None = None,
        limited: bool = True,
    ) -> Outgoing:
        """Record a request's future and put it in the outbox, atomically: publish it, then `mark_published`.

        limited: QuotaExceeded (429) when the owner has TINKERBELL_MAX_QUEUED_REQUESTS_PER_KEY requests without a
        result (creates are not limited here: the adapters limit bounds them)."""
        keys = [P + f"future:{request_id}", PENDING_FUTURES, OUTBOX, OUTBOX_DUE, queued_key(owner)]
        args = [
            queue,
            message,
            request_id,
            _dumps(owner),
            _dumps(kind),
            _dumps(model_id),
            time.time(),
            FUTURE_TTL_S,
            PENDING_FUTURES_MAX,
            self.settings.max_queued_requests_per_key if limited else 0,
        ]
        pushed, *count = self._script("_push", _PUSH_LUA)(keys=keys, args=args)
        if not pushed:
            raise queue_full_error(self.settings, int(count[0]))
        return Outgoing(request_id, queue, message)

    def finish_request(self, request_id: str) -> None:
        """A worker stored the request's result: no longer pending, nor counted among its owner's queued ones."""
        self._script("_finish", _FINISH_LUA)(keys=[P + f"future:{request_id}", PENDING_FUTURES], args=[request_id, P])

    def prune_queued(self, owner: str, has_result: Any) -> int:
        """Drop from the owner's queued set what a worker finished without saying so (it died between storing the
        result and finish_request), what can no longer run (its future expired, its model was removed) and what
        has a stored result; has_result(request_ids) -> list of bools, from the result backend. Returns how many
        are left. Run only when the limit is reached, so the count heals where it matters."""
        key = queued_key(owner)
        ids = self.redis.zrange(key, 0, -1)
        if not ids:
            return 0
        with self.redis.pipeline(transaction=False) as pipe:
            for request_id in ids:
                pipe.hmget(P + f"future:{request_id}", "owner", "model_id")
            futures = pipe.execute()
        model_ids = [json.loads(model_id) if owner and model_id else None for owner, model_id in futures]
        models = sorted(set(filter(None, model_ids)))
        with self.redis.pipeline(transaction=False) as pipe:
            for model_id in models:
                pipe.hget(P + f"model:{model_id}", "deleted")
            removed = {model_id: flag == "true" for model_id, flag in zip(models, pipe.execute())}
        stored = has_result(ids)
        gone = [
            request_id
            for request_id, (owner, _), model_id, done in zip(ids, futures, model_ids, stored)
            if done or not owner or (model_id is not None and removed[model_id])
        ]
        if gone:
            self.redis.zrem(key, *gone)
        return len(ids) - len(gone)

    def usage(self, owner: str) -> dict[str, int]:
        """What the owner uses of its per-key limits: live adapters, requests without a result, checkpoint bytes."""
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.zcard(P + f"owner:{owner}:models")
            pipe.zcard(queued_key(owner))
            pipe.get(checkpoint_bytes_key(owner))
            adapters, queued, stored = pipe.execute()
        return {"adapters": int(adapters), "queued_requests": int(queued), "checkpoint_bytes": int(stored or 0)}

    def mark_published(self, request_ids: list[str], keep: list[Outgoing] = ()) -> None:
        """These requests are on the broker: out of the outbox. keep: those whose message is kept until their result
        is stored (adapter requests: `sent`), in the same round trip."""
        if request_ids:
            with self.redis.pipeline(transaction=False) as pipe:
                pipe.hdel(OUTBOX, *request_ids)
                pipe.zrem(OUTBOX_DUE, *request_ids)
                now = time.time()
                for item in keep:
                    pipe.set(SENT + item.request_id, json.dumps([item.queue, item.message, now]), ex=SENT_TTL_S)
                pipe.execute()

    def sent(self, request_ids: list[str]) -> dict[str, tuple[Outgoing, float]]:
        """The kept messages of published adapter requests with no stored result yet (mark_published keep), with
        when each was last published."""
        found = self.redis.mget([SENT + rid for rid in request_ids]) if request_ids else []
        kept = {}
        for rid, raw in zip(request_ids, found):
            if raw is not None:
                queue, message, published = json.loads(raw)
                kept[rid] = (Outgoing(rid, queue, message), float(published))
        return kept

    def claim_unpublished(self, older_than_s: float = OUTBOX_GRACE_S, limit: int = 100) -> list[Outgoing]:
        """Outbox entries ready longer than older_than_s and still not marked published, oldest first, claimed for
        this caller for another older_than_s (a sweep publishes them again)."""
        now = time.time()
        flat = self._script("_claim", _CLAIM_LUA)(keys=[OUTBOX, OUTBOX_DUE], args=[now - older_than_s, now, limit])
        claimed = []
        for request_id, entry in zip(flat[::2], flat[1::2]):
            queue, message = json.loads(entry)
            claimed.append(Outgoing(request_id, queue, message))
        return claimed

    def next_seq(self, model_id: str, owner: str) -> int:
        """Hand out the seq_id for a request that came without one (native callers that do not number)."""
        base = P + f"seq:{model_id}"
        seq = int(
            self._script("_reserve", _RESERVE_LUA)(
                keys=[base + ":admitted", base + ":next", base + ":reserved", P + f"model:{model_id}"],
                args=[_dumps(owner)],
            )
        )
        if seq < 0:
            raise NotFound(f"model_id: no such model '{model_id}'")
        return seq

    def release_gap(self, model_id: str, older_than_s: float, queue: str) -> list[Outgoing]:
        """When the model's requests have been held longer than older_than_s behind missing seq_ids, stop waiting for
        those (in O(1), whatever the gap's size) and return the requests that run now (in the outbox: publish each,
        then `mark_published`). A missing seq_id that arrives later is answered 'expired-…' by `submit`."""
        base = P + f"seq:{model_id}"
        keys = [base + ":ids", base + ":admitted", base + ":pending", base + ":next", base + ":held_since"]
        now = time.time()
        flat = self._script("_release_gap", _RELEASE_GAP_LUA)(
            keys=[*keys, OUTBOX, OUTBOX_DUE], args=[now - older_than_s, now, queue]
        )
        return [Outgoing(rid, queue, message) for rid, message in zip(flat[::2], flat[1::2])]

    def admitted_between(self, model_id: str, after: int, before: int) -> dict[int, str]:
        """seq_id -> request id of the model's requests admitted with after < seq_id < before (workers' engine)."""
        base = P + f"seq:{model_id}"
        seqs = self.redis.zrangebyscore(base + ":admitted", f"({after}", f"({before}")
        if not seqs:
            return {}
        return {int(seq): rid for seq, rid in zip(seqs, self.redis.hmget(base + ":ids", seqs)) if rid is not None}

    def _script(self, name: str, source: str) -> Any:
        if not hasattr(self, name):
            setattr(self, name, self.redis.register_script(source))
        return getattr(self, name)

    # ---- checkpoints ----------------------------------------------------------------------
    def add_checkpoint(self, model_id: str, checkpoint: dict[str, Any], limited: bool = False) -> None:
        """Store (or update) a checkpoint record; one with expires_at is also indexed by it for the TTL sweep. Its
        size_bytes count towards its owner's stored bytes (one replaced under the same id gives its own back).

        limited: QuotaExceeded (nothing stored) when the record would take its owner past
        TINKERBELL_MAX_CHECKPOINT_BYTES_PER_KEY."""
        member = f"{model_id}\x00{checkpoint['checkpoint_id']}"
        owner = checkpoint.get("owner")
        size = int(checkpoint.get("size_bytes") or 0) if isinstance(owner, str) else 0
        limit = self.settings.max_checkpoint_bytes_per_key if limited else 0
        expires = float(checkpoint["expires_at"]) if checkpoint.get("expires_at") else ""
        stored_ok, stored = self._script("_add_checkpoint", _ADD_CHECKPOINT_LUA)(
            keys=[P + f"ckpt:{model_id}", P + "ckpt_expiry", checkpoint_bytes_key(owner if size else "-")],
            args=[checkpoint["checkpoint_id"], _dumps(checkpoint), member, expires, size, limit, P],
        )
        if stored_ok < 0:
            raise checkpoint_bytes_error(self.settings, int(stored), size)

    def claim_expired_checkpoints(self, now: float, limit: int = 100) -> list[tuple[str, dict[str, Any]]]:
        """Checkpoints whose TTL has passed, each removed from the index by exactly one caller (ZREM decides who):
        (model_id, record) pairs for the claimer to delete, files then record."""
        claimed = []
        for member in self.redis.zrangebyscore(P + "ckpt_expiry", "-inf", now, start=0, num=limit):
            if not self.redis.zrem(P + "ckpt_expiry", member):
                continue  # another worker took it
            model_id, checkpoint_id = member.split("\x00", 1)
            record = self.checkpoint(model_id, checkpoint_id)
            if record is not None and record.get("expires_at") and record["expires_at"] <= now:
                claimed.append((model_id, record))
        return claimed

    def checkpoints(self, model_id: str) -> list[dict[str, Any]]:
        items = [json.loads(v) for v in self.redis.hvals(P + f"ckpt:{model_id}")]
        now = time.time()
        return sorted((c for c in items if not c.get("expires_at") or c["expires_at"] > now), key=lambda c: c["time"])

    def checkpoint(self, model_id: str, checkpoint_id: str) -> dict[str, Any] | None:
        raw = self.redis.hget(P + f"ckpt:{model_id}", checkpoint_id)
        return json.loads(raw) if raw else None

    def delete_checkpoint(self, model_id: str, checkpoint_id: str) -> None:
        """Remove the record (its owner's stored bytes go down by its size); the caller deletes the files."""
        self._script("_delete_checkpoint", _DELETE_CHECKPOINT_LUA)(
            keys=[P + f"ckpt:{model_id}", P + "ckpt_expiry"], args=[checkpoint_id, f"{model_id}\x00{checkpoint_id}", P]
        )

    # ---- samplers -------------------------------------------------------------------------
    def create_sampler(
        self,
        sampler_id: str,
        owner: str,
        session_id: str,
        base_model: str,
        model_path: str | None,
        adapter_dir: str | None,
    ) -> None:
        self._put(
            f"sampler:{sampler_id}",
            {
                "owner": owner,
                "session_id": session_id,
                "base_model": base_model,
                "model_path": model_path,
                "adapter_dir": adapter_dir,
                "created": time.time(),
            },
        )
        self.redis.zadd(P + f"session:{session_id}:samplers", {sampler_id: time.time()})

    def sampler(self, sampler_id: str, owner: str) -> dict[str, Any]:
        return self._owned("sampler", sampler_id, owner, "sampling_session_id")

    # ---- sampled sequences kept on record (record_stability_info) ---------------------------------------
    def record_sequences(
        self, owner: str, sampler_id: str | None, request_id: str, sequence_ids: list[str], ttl_s: float
    ) -> None:
        """Keep each sequence_id of a sample request for ttl_s: whose it is, and where its tokens and logprobs are
        (sample `index` of the result of `request_id`, which the result backend keeps longer)."""
        now = time.time()
        with self.redis.pipeline(transaction=False) as pipe:
            for index, sequence_id in enumerate(sequence_ids):
                key = P + f"sequence:{sequence_id}"
                record = {"owner": owner, "sampler_id": sampler_id, "request_id": request_id, "index": index}
                pipe.hset(key, mapping={k: _dumps(v) for k, v in {**record, "created": now}.items()})
                pipe.expire(key, max(1, int(ttl_s)))
            pipe.execute()

    def sampled_sequence(self, sequence_id: str, owner: str) -> dict[str, Any]:
        """The record of a kept sequence_id; NotFound once it expired, or for another key's."""
        return self._owned("sequence", sequence_id, owner, "sequence_id")

    # ---- loss catalog (workers publish the built-ins; api/ reads it without importing torch) ----
    def publish_builtin_losses(self, catalog: list[dict[str, Any]]) -> None:
        self.redis.hset(P + "losses:builtin", mapping={c["name"]: _dumps(c) for c in catalog})

    def builtin_losses(self) -> list[dict[str, Any]]:
        return [json.loads(v) for v in self.redis.hvals(P + "losses:builtin")]

    def custom_losses(self, owner: str) -> list[dict[str, Any]]:
        """Latest version of each of the owner's custom losses (metadata only, not code)."""
        return [json.loads(v) for v in self.redis.hvals(P + f"losses:custom:{owner}")]

    def builtin_loss_names(self) -> set[str]:
        return set(self.redis.hkeys(P + "losses:builtin"))

    def model_and_loss(
        self, model_id: str, owner: str, loss_name: str
    ) -> tuple[dict[str, Any], bool, bool, str | None]:
        """One round trip for a training request: (the owner's model, loss catalog published?, built-in loss?,
        the owner's custom loss metadata or None). NotFound for another key's or a removed model."""
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.hgetall(P + f"model:{model_id}")
            pipe.exists(P + "losses:builtin")
            pipe.hexists(P + "losses:builtin", loss_name)
            pipe.hget(P + f"losses:custom:{owner}", loss_name)
            raw, catalog, builtin, custom = pipe.execute()
        model = _check_owned(_load_hash(raw) if raw else None, "model", model_id, owner, "model_id")
        return model, bool(catalog), bool(builtin), custom

    # ---- counters for /metrics and the status page ----------------------------------------
    def apply_updates(
        self,
        models: dict[str, dict[str, Any]],
        stats: dict[str, float],
        worker: str | None = None,
        epochs: dict[str, int] | None = None,
    ) -> None:
        """Several model field updates and stat increments in one round trip. With worker: each model's fields are
        written only while that worker holds it with its epoch in `epochs` (fenced); one it does not hold is skipped."""
        with self.redis.pipeline(transaction=False) as pipe:
            for model_id, fields in models.items():
                if worker is None:
                    pipe.hset(P + f"model:{model_id}", mapping={k: _dumps(v) for k, v in fields.items()})
                elif model_id in (epochs or {}):
                    self._fenced_set(model_id, worker, (epochs or {})[model_id], fields, client=pipe)
            for name, amount in stats.items():
                pipe.hincrbyfloat(P + "stats", name, amount)
            pipe.execute()

    def stats(self) -> dict[str, float]:
        return {k: float(v) for k, v in self.redis.hgetall(P + "stats").items()}
