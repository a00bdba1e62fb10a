"""The job state machine's atomic transitions, as Lua scripts that `jobs.store.JobStore` registers.

Each runs inside Redis, so claim / cancel / finish / requeue / reconcile never race; times come from Redis' own clock
(`TIME`), so staleness never depends on two machines' clocks agreeing. KEYS and ARGV are listed above each script.
"""

_NOW = "local _t = redis.call('TIME'); local now = tonumber(_t[1]) + tonumber(_t[2]) / 1000000\n"

# KEYS: job, events, active, stats, done; ARGV: state, result_json, error, ttl, maxlen, event_data_json, job_id
# `done` gets the final state pushed, for the one request that waits on the job (BLPOP, no wake-up per step)
_FINISH_BODY = """
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
    + """
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return 0 end
if state == 'succeeded' or state == 'failed' or state == 'cancelled' then return 0 end
"""
    + _FINISH_BODY
    + "return 1"
)

# Same KEYS/ARGV as FINISH (state = 'cancelled'); a queued job ends now, a running one is asked to stop.
CANCEL = (
    _NOW
    + """
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return 'missing' end
if state == 'succeeded' or state == 'failed' or state == 'cancelled' then return 'finished' end
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

# KEYS: job, events; ARGV: worker, stale_after, max_attempts, maxlen
CLAIM = (
    _NOW
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
redis.call('HSET', KEYS[1], 'state', 'running', 'worker', ARGV[1], 'heartbeat_at', tostring(now), 'enqueued', '1')
if not redis.call('HGET', KEYS[1], 'started_at') then redis.call('HSET', KEYS[1], 'started_at', tostring(now)) end
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[4], '*', 'type', 'started',
  'data', cjson.encode({attempt = attempts, worker = ARGV[1]}))
return {'run', tostring(attempts)}
"""
)

# KEYS: job, events; ARGV: worker, maxlen, reason. The owner hands a running job back to the queue (its worker is
# shutting down): queued again, this attempt not counted. 1 if it was still this worker's.
REQUEUE = """
if redis.call('HGET', KEYS[1], 'state') ~= 'running' then return 0 end
if redis.call('HGET', KEYS[1], 'worker') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'state', 'queued', 'enqueued', '0')
redis.call('HDEL', KEYS[1], 'worker')
redis.call('HINCRBY', KEYS[1], 'attempts', -1)
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

# KEYS: job, events, active; ARGV: stale_after, max_attempts, maxlen, enqueue_grace, job_id
RECONCILE = (
    _NOW
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
