"""The job state machine's atomic transitions, as Lua scripts that `jobs.store.JobStore` registers.

Each runs inside Redis, so claim / cancel / finish / requeue / reconcile never race; times come from Redis' own clock
(`TIME`), so staleness never depends on two machines' clocks agreeing. KEYS and ARGV are listed above each script.
"""

_NOW = "local _t = redis.call('TIME'); local now = tonumber(_t[1]) + tonumber(_t[2]) / 1000000\n"

# Admission accounting, kept with every transition: `queued` (hash "{queue}:jobs", "{queue}:seconds": what waits in
# each queue, whatever the kinds of its jobs) and `usage` (hash "{owner}:jobs", "{owner}:seconds": each key's queued
# + running jobs). Seconds are the job's `estimate_s`. `_ADD(hash, field_prefix, sign)` adds one job's share; never
# below zero. A record written before jobs had a `queue` field is counted under its kind (then the same name).
_ACCOUNT = """
local function _add(hash, prefix, sign)
  local est = tonumber(redis.call('HGET', KEYS[1], 'estimate_s') or '0') or 0
  local n = redis.call('HINCRBY', hash, prefix .. ':jobs', sign)
  if n < 0 then redis.call('HSET', hash, prefix .. ':jobs', 0) end
  local secs = tonumber(redis.call('HINCRBYFLOAT', hash, prefix .. ':seconds', sign * est))
  if secs < 0.001 then redis.call('HSET', hash, prefix .. ':seconds', 0) end
end
local function _kind() return redis.call('HGET', KEYS[1], 'kind') or '' end
local function _queue() return redis.call('HGET', KEYS[1], 'queue') or _kind() end
local function _owner() return redis.call('HGET', KEYS[1], 'owner') or 'anonymous' end
"""

# KEYS: job, events, index, active, queued, usage, owner_index, batchable
# ARGV: job_id, kind, request_json, created_at, estimate_s, owner, maxlen, max_queued_jobs, max_queued_seconds,
#       key_max_jobs, key_max_seconds, webhook_url, webhook_progress, batch_key, ttl, queue
# A generate job with a batch key is also listed in `batchable` (a zset per key, by creation time), where a worker
# running a job with the same key finds it (jobs.store.JobStore.claim_batchable).
# Admission and creation in one step, so two requests can't both take the last place. Returns {'ok', ''} or
# {reason, seconds now waiting} with reason queue_full | key_jobs | key_seconds.
ADMIT = _ACCOUNT + """
local kind, owner, est, queue = ARGV[2], ARGV[6], tonumber(ARGV[5]), ARGV[16]
local q_jobs = tonumber(redis.call('HGET', KEYS[5], queue .. ':jobs') or '0')
local q_secs = tonumber(redis.call('HGET', KEYS[5], queue .. ':seconds') or '0')
if q_jobs + 1 > tonumber(ARGV[8]) or q_secs + est > tonumber(ARGV[9]) then
  return {'queue_full', tostring(q_secs)}
end
local k_jobs = tonumber(redis.call('HGET', KEYS[6], owner .. ':jobs') or '0')
local k_secs = tonumber(redis.call('HGET', KEYS[6], owner .. ':seconds') or '0')
if k_jobs + 1 > tonumber(ARGV[10]) then return {'key_jobs', tostring(k_secs)} end
if k_secs + est > tonumber(ARGV[11]) then return {'key_seconds', tostring(k_secs)} end
redis.call('HSET', KEYS[1], 'id', ARGV[1], 'kind', kind, 'state', 'queued', 'request', ARGV[3],
  'created_at', ARGV[4], 'attempts', 0, 'enqueued', 0, 'estimate_s', ARGV[5], 'owner', owner, 'queue', queue)
if ARGV[12] ~= '' then
  redis.call('HSET', KEYS[1], 'webhook_url', ARGV[12], 'webhook_progress', ARGV[13])
end
if ARGV[14] ~= '' then
  redis.call('HSET', KEYS[1], 'batch_key', ARGV[14])
  redis.call('ZADD', KEYS[8], ARGV[4], ARGV[1])
  redis.call('EXPIRE', KEYS[8], ARGV[15])
end
redis.call('ZADD', KEYS[3], ARGV[4], ARGV[1])
redis.call('ZADD', KEYS[7], ARGV[4], ARGV[1])
redis.call('SADD', KEYS[4], ARGV[1])
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[7], '*', 'type', 'queued', 'data', cjson.encode({kind = kind}))
_add(KEYS[5], queue, 1)
_add(KEYS[6], owner, 1)
return {'ok', ''}
"""

# KEYS: job, events, active, stats, done, queued, usage, webhook outbox
# ARGV: state, result_json, error, ttl, maxlen, event_data_json, job_id
# `done` gets the final state pushed: one key that exists only once the job ended (a client may BLPOP it; the API
# waits through its event hub instead);
# a job with a webhook goes into the outbox the workers deliver from, in the same step as its final state.
_FINISH_BODY = """
if state == 'queued' then _add(KEYS[6], _queue(), -1) end
_add(KEYS[7], _owner(), -1)
if redis.call('HGET', KEYS[1], 'webhook_url') then redis.call('RPUSH', KEYS[8], ARGV[7]) end
redis.call('HSET', KEYS[1], 'state', ARGV[1], 'finished_at', tostring(now), 'result', ARGV[2], 'error', ARGV[3])
redis.call('HDEL', KEYS[1], 'worker')
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[5], '*', 'type', ARGV[1], 'data', ARGV[6])
redis.call('EXPIRE', KEYS[1], ARGV[4])
redis.call('EXPIRE', KEYS[2], ARGV[4])
redis.call('SREM', KEYS[3], ARGV[7])
redis.call('HINCRBY', KEYS[4], redis.call('HGET', KEYS[1], 'kind') .. ':' .. ARGV[1], 1)
redis.call('RPUSH', KEYS[5], ARGV[1])
redis.call('EXPIRE', KEYS[5], ARGV[4])
"""

FINISH = (
    _NOW
    + _ACCOUNT
    + """
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return 0 end
if state == 'succeeded' or state == 'failed' or state == 'cancelled' then return 0 end
"""
    + _FINISH_BODY
    + "return 1"
)

# Same KEYS/ARGV as FINISH (state = 'cancelled'), plus ARGV[8] = '1' to leave a running job alone (returns
# 'running'); a queued job ends now, a running one is asked to stop.
CANCEL = (
    _NOW
    + _ACCOUNT
    + """
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return 'missing' end
if state == 'succeeded' or state == 'failed' or state == 'cancelled' then return 'finished' end
if state == 'running' and ARGV[8] == '1' then return 'running' end
if state == 'running' then
  if redis.call('HGET', KEYS[1], 'cancel_requested') ~= '1' then
    redis.call('HSET', KEYS[1], 'cancel_requested', '1')
    redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[5], '*', 'type', 'cancel_requested', 'data', '{}')
  end
  return 'requested'
end
redis.call('HSET', KEYS[1], 'cancel_requested', '1')
"""
    + _FINISH_BODY
    + "return 'cancelled'"
)

# KEYS: job, events, queued; ARGV: worker, stale_after, max_attempts, maxlen
CLAIM = (
    _NOW
    + _ACCOUNT
    + """
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return {'missing', ''} end
if state ~= 'queued' and state ~= 'running' then return {'finished', state} end
if state == 'running' then
  local hb = tonumber(redis.call('HGET', KEYS[1], 'heartbeat_at') or '0')
  if now - hb < tonumber(ARGV[2]) then return {'busy', redis.call('HGET', KEYS[1], 'worker') or ''} end
end
if redis.call('HGET', KEYS[1], 'cancel_requested') == '1' then return {'cancel', ''} end
local attempts = redis.call('HINCRBY', KEYS[1], 'attempts', 1)
if attempts > tonumber(ARGV[3]) then return {'exhausted', tostring(attempts - 1)} end
if state == 'queued' then _add(KEYS[3], _queue(), -1) end
redis.call('HSET', KEYS[1], 'state', 'running', 'worker', ARGV[1], 'heartbeat_at', tostring(now), 'enqueued', '1')
if not redis.call('HGET', KEYS[1], 'started_at') then redis.call('HSET', KEYS[1], 'started_at', tostring(now)) end
-- the worker's name stays in the record (the reconciler needs it); events and answers never show it
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[4], '*', 'type', 'started', 'data', cjson.encode({attempt = attempts}))
return {'run', tostring(attempts)}
"""
)

# KEYS: job, events, queued; ARGV: worker, maxlen, reason. The owner hands a running job back to the queue (its
# worker is shutting down): queued again, this attempt not counted. 1 if it was still this worker's.
REQUEUE = _ACCOUNT + """
if redis.call('HGET', KEYS[1], 'state') ~= 'running' then return 0 end
if redis.call('HGET', KEYS[1], 'worker') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'state', 'queued', 'enqueued', '0')
redis.call('HDEL', KEYS[1], 'worker')
redis.call('HINCRBY', KEYS[1], 'attempts', -1)
_add(KEYS[3], _queue(), 1)
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[2], '*', 'type', 'requeued', 'data', cjson.encode({reason = ARGV[3]}))
return 1
"""

# KEYS: job; ARGV: worker. 1 while this worker still owns the running job, else 0.
HEARTBEAT = (
    _NOW
    + """
if redis.call('HGET', KEYS[1], 'state') ~= 'running' then return 0 end
if redis.call('HGET', KEYS[1], 'worker') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'heartbeat_at', tostring(now))
return 1
"""
)

# KEYS: job, events, active, queued; ARGV: stale_after, max_attempts, maxlen, enqueue_grace, job_id
RECONCILE = (
    _NOW
    + _ACCOUNT
    + """
local state = redis.call('HGET', KEYS[1], 'state')
if not state or state == 'succeeded' or state == 'failed' or state == 'cancelled' then
  redis.call('SREM', KEYS[3], ARGV[5])
  return 'gone'
end
if state == 'running' then
  local hb = tonumber(redis.call('HGET', KEYS[1], 'heartbeat_at') or '0')
  if now - hb < tonumber(ARGV[1]) then return 'ok' end
  local attempts = tonumber(redis.call('HGET', KEYS[1], 'attempts') or '0')
  if attempts >= tonumber(ARGV[2]) then return 'exhausted' end
  if redis.call('HGET', KEYS[1], 'cancel_requested') == '1' then return 'cancel' end
  redis.call('HSET', KEYS[1], 'state', 'queued', 'enqueued', '1')
  redis.call('HDEL', KEYS[1], 'worker')
  _add(KEYS[4], _queue(), 1)
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], '*', 'type', 'requeued',
    'data', cjson.encode({reason = 'worker heartbeat stale', attempts = attempts}))
  return 'requeue'
end
if redis.call('HGET', KEYS[1], 'enqueued') ~= '1' then
  local created = tonumber(redis.call('HGET', KEYS[1], 'created_at') or '0')
  if now - created < tonumber(ARGV[4]) then return 'ok' end
  redis.call('HSET', KEYS[1], 'enqueued', '1')
  return 'enqueue'
end
return 'ok'
"""
)

# KEYS: reservation; ARGV: holder. Compare-and-delete.
RELEASE = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"
