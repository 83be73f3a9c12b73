-- Crucible's broker operations, one atomic call each (modelled on Dramatiq's dispatch.lua).
--
-- dispatch(keys=[namespace], args=[command, worker_id, heartbeat_timeout_ms, ...])
-- Time comes from the server's clock (TIME), so a worker whose clock is behind is not taken
-- for dead. Settling commands (ack, nack, retry, requeue) may be sent twice safely.
--
-- $ns:queue:$level     list of message ids ready to run, oldest first (levels: high, default, low)
-- $ns:delayed          zset message id -> eta (ms); moved to its level's list once due
-- $ns:msgs             hash message id -> encoded message
-- $ns:level            hash message id -> level
-- $ns:task             hash message id -> task id (celery-<eval_id>), and
-- $ns:task_msg         hash task id -> message id: how a cancel finds a queued message
-- $ns:eval_of          hash message id -> the evaluation it runs, for messages whose fetch marks
--                      that evaluation running (and whose hand-back marks it queued)
-- $ns:deliveries       hash message id -> how many times it was fetched: a delivery's attempt
--                      token is "<message id>#<n>", so a stalled worker's late result, taken
--                      for dead and redelivered meanwhile, no longer passes for the new one's
-- $ns:acks:$worker     set of message ids a worker fetched and has not acked
-- $ns:heartbeats       zset worker id -> last heartbeat (ms)
-- $ns:doorbell:$level  list of tokens; an enqueue rings it so idle workers wake at once
-- $ns:dlq             zset task id -> last failure (ms): the dead-letter queue
-- $ns:dlq:entries     hash task id -> JSON entry (arguments, final traceback, retry count...)
-- $ns:once:$key        marks an idempotency key already enqueued (expires)

local ns = KEYS[1]
local command = ARGV[1]
local server_time = redis.call("TIME")
local now = tonumber(server_time[1]) * 1000 + math.floor(tonumber(server_time[2]) / 1000)
local worker_id = ARGV[2]
local heartbeat_timeout = tonumber(ARGV[3])

local msgs = ns .. ":msgs"
local levels = ns .. ":level"
local tasks = ns .. ":task"
local task_msg = ns .. ":task_msg"
local eval_of = ns .. ":eval_of"
local deliveries = ns .. ":deliveries"
local delayed = ns .. ":delayed"
local heartbeats = ns .. ":heartbeats"
local DOORBELL_TOKENS = 64

local function queue_key(level) return ns .. ":queue:" .. level end
local function acks_key(worker) return ns .. ":acks:" .. worker end

local function ring(level)
    local bell = ns .. ":doorbell:" .. level
    redis.call("rpush", bell, "1")
    redis.call("ltrim", bell, -DOORBELL_TOKENS, -1)
end

-- Forget a message entirely (after ack, nack or cancel).
local function forget(message_id)
    local task_id = redis.call("hget", tasks, message_id)
    if task_id and redis.call("hget", task_msg, task_id) == message_id then
        redis.call("hdel", task_msg, task_id)
    end
    redis.call("hdel", msgs, message_id)
    redis.call("hdel", levels, message_id)
    redis.call("hdel", tasks, message_id)
    redis.call("hdel", eval_of, message_id)
    redis.call("hdel", deliveries, message_id)
end

-- Put a fetched message back at the head of its level: it was taken in priority order.
-- `handed_back`: its worker gives it back (stopping), so its evaluation, marked running by
-- this delivery, is queued again. Not so for a worker taken for dead: it may only be stalled,
-- and finish the run before anyone fetches the message again.
local function return_to_head(message_id, handed_back)
    local level = redis.call("hget", levels, message_id)
    if level and redis.call("hexists", msgs, message_id) == 1 then
        redis.call("lpush", queue_key(level), message_id)
        ring(level)
        local eval_id = handed_back and redis.call("hget", eval_of, message_id)
        if eval_id then
            local delivery = redis.call("hget", deliveries, message_id)
            local attempt = delivery and message_id .. "#" .. delivery or message_id
            transition(ns, eval_id, "queued", now, "running", {worker = ""}, {attempt = attempt}, "0", {})
        end
    end
end

-- A worker that is gone (dead, or leaving: `handed_back`) hands its unacked messages back;
-- returns how many.
local function release(worker, handed_back)
    local ids = redis.call("smembers", acks_key(worker))
    for i = #ids, 1, -1 do
        return_to_head(ids[i], handed_back)
    end
    redis.call("del", acks_key(worker))
    redis.call("zrem", heartbeats, worker)
    return #ids
end

-- Take a message this worker is settling, named by its delivery's attempt token ("<message
-- id>#<n>", or the bare id of a message its fetch did not mark): out of its ack set and, if a
-- peer handed it back meanwhile (this worker was taken for dead), out of the queues again.
-- Returns the message id only if this worker's delivery is still the message's own (held, or
-- back in a queue with no later fetch); false when it was settled already (a re-sent command,
-- so settling twice changes nothing) or fetched again since (by a worker that settles it, or
-- that was taken for dead in turn and whose redelivery is due).
local function claim(token)
    local message_id, delivery = string.match(token, "^(.-)#(%d+)$")
    message_id = message_id or token
    local held = redis.call("srem", acks_key(worker_id), message_id) == 1
    if redis.call("hexists", msgs, message_id) == 0 then return false end
    if held then return message_id end
    if delivery and redis.call("hget", deliveries, message_id) ~= delivery then return false end
    -- handed back meanwhile: out of the queues again. Only then, as LREM reads the whole
    -- list, which under a backlog made every ack cost O(backlog).
    local removed = 0
    local level = redis.call("hget", levels, message_id)
    if level then removed = redis.call("lrem", queue_key(level), 0, message_id) end
    removed = removed + redis.call("zrem", delayed, message_id)
    return removed > 0 and message_id
end

-- Workers whose heartbeat stopped are released; due delays become ready.
local function maintain()
    for _, dead in ipairs(redis.call("zrangebyscore", heartbeats, 0, now - heartbeat_timeout)) do
        release(dead)
    end
    local due = redis.call("zrangebyscore", delayed, 0, now, "LIMIT", 0, 500)
    for _, message_id in ipairs(due) do
        redis.call("zrem", delayed, message_id)
        local level = redis.call("hget", levels, message_id)
        if level then
            redis.call("rpush", queue_key(level), message_id)
            ring(level)
        end
    end
end

-- Whether a message's evaluation belongs to a key already running as many as it may.
local function at_its_keys_limit(message_id)
    local eval_id = redis.call("hget", eval_of, message_id)
    if not eval_id then return false end
    local found = redis.call("hmget", ns .. ":eval:" .. eval_id, "owner", "max_running")
    local owner, cap = found[1], tonumber(found[2])
    if not owner or not cap or cap <= 0 then return false end
    return redis.call("scard", ns .. ":running:" .. owner) >= cap
end

-- args from `first`: message_id, level, task_id, delay_ms (0 = now), encoded message, and the
-- evaluation whose status its fetch sets running ("" for none).
-- A message id already known is not enqueued again (a re-sent command).
local function enqueue(first)
    local message_id, level, task_id = ARGV[first], ARGV[first + 1], ARGV[first + 2]
    local eta, data = now + tonumber(ARGV[first + 3]), ARGV[first + 4]
    if redis.call("hexists", msgs, message_id) == 1 then return end
    redis.call("hset", msgs, message_id, data)
    redis.call("hset", levels, message_id, level)
    redis.call("hset", tasks, message_id, task_id)
    redis.call("hset", task_msg, task_id, message_id)
    if ARGV[first + 5] ~= "" then
        redis.call("hset", eval_of, message_id, ARGV[first + 5])
    end
    if eta > now then
        redis.call("zadd", delayed, eta, message_id)
    else
        redis.call("rpush", queue_key(level), message_id)
        ring(level)
    end
end

if command == "enqueue" then
    enqueue(4)
    return 1

elseif command == "submit" then
    -- args: the key of a record that must not exist yet, the JSON list of commands that write
    -- it (the store makes them), the submitting key's quota as JSON ([bucket, active key,
    -- rate_per_s, burst, max_active, eval_id, stored-bytes prefix, stored_limit], or "" for
    -- none), a message as for enqueue, then the levels
    -- whose ready messages count as ahead of it. One call: the quota, the record and its message
    -- change together or not at all. Returns {-1} when the record exists already and admit()'s
    -- refusal (quota.lua) when the quota refuses, both having changed nothing; else
    -- {1, tokens left, ms until the bucket is full, ready messages ahead of this one}
    -- (tokens and ms are -1 without a quota). The record keeps the message's id as
    -- `submission_id`: the same call again (a client re-sending it after losing the reply) finds
    -- its own record and gets {2, -1, -1, ahead}, having changed nothing.
    local function ahead()
        local n = -1
        for i = 13, #ARGV do
            n = n + redis.call("llen", queue_key(ARGV[i]))
        end
        return n
    end
    if redis.call("exists", ARGV[4]) == 1 then
        if redis.call("hget", ARGV[4], "submission_id") == ARGV[7] then return {2, -1, -1, ahead()} end
        return {-1}
    end
    local admitted = {1, -1, -1}
    if ARGV[6] ~= "" then
        local q = cjson.decode(ARGV[6])
        admitted = admit(q[1], q[2], q[3], q[4], q[5], {q[6]}, now, q[7], q[8])
        if admitted[1] == 0 then return admitted end
    end
    for _, op in ipairs(cjson.decode(ARGV[5])) do
        redis.call(unpack(op))
    end
    redis.call("hset", ARGV[4], "submission_id", ARGV[7])
    enqueue(7)
    return {1, admitted[2], admitted[3], ahead()}

elseif command == "enqueue_once" then
    -- args: an idempotency key and how long to remember it (ms), then a message as for
    -- enqueue. The same key again (a second scheduler sending the same tick) enqueues nothing.
    if not redis.call("set", ns .. ":once:" .. ARGV[4], "1", "NX", "PX", ARGV[5]) then
        return 0
    end
    enqueue(6)
    return 1

elseif command == "retry" then
    -- args: the fetched delivery's attempt token, then a new message as for enqueue (usually delayed)
    local message_id = claim(ARGV[4])
    if message_id then
        forget(message_id)
        enqueue(5)
    end
    return 1

elseif command == "cancel" then
    -- args: task id; removes its message only if it is waiting (ready or delayed), never
    -- one a worker holds: that one is stopped by its status instead
    local message_id = redis.call("hget", task_msg, ARGV[4])
    if not message_id then return 0 end
    local level = redis.call("hget", levels, message_id)
    local removed = redis.call("zrem", delayed, message_id)
    if level then
        removed = removed + redis.call("lrem", queue_key(level), 0, message_id)
    end
    if removed > 0 then
        forget(message_id)
    end
    return removed

elseif command == "fetch" then
    -- args: how many, the start time (ISO) and worker name to record, the histograms' bucket
    -- bounds (CSV), then the levels to take from, highest first. Each message enqueued with an
    -- evaluation is marked running here, as MarkRunning would (middleware/running.py), saving
    -- its worker that round trip. Returns {encoded message, mark} per message; mark is "-" (not
    -- marked), "+" .. its attempt token (now running) or "=" .. the status that refused it ("" for
    -- no record).
    redis.call("zadd", heartbeats, now, worker_id)
    maintain()
    local wanted = tonumber(ARGV[4])
    local started_at, worker_name = ARGV[5], ARGV[6]
    local bounds = {}
    for bound in string.gmatch(ARGV[7], "[^,]+") do bounds[#bounds + 1] = tonumber(bound) end
    local taken = {}
    -- A message whose key runs as many evaluations as it may (the record's max_running) waits
    -- at the tail of its level, behind other keys' messages, and is looked at again by a later
    -- fetch; each fetch passes over at most this many.
    local passed_over, may_pass = 0, wanted * 4 + 8
    for i = 8, #ARGV do
        local queue = queue_key(ARGV[i])
        local deferred = {}
        while #taken < wanted * 2 do
            local message_id = redis.call("lpop", queue)
            if not message_id then break end
            local data = redis.call("hget", msgs, message_id)
            if data and at_its_keys_limit(message_id) then
                if passed_over >= may_pass then
                    redis.call("lpush", queue, message_id)  -- back where it was: enough looking
                    break
                end
                deferred[#deferred + 1] = message_id
                passed_over = passed_over + 1
                data = nil
            end
            if data then
                redis.call("sadd", acks_key(worker_id), message_id)
                local mark = "-"
                local eval_id = redis.call("hget", eval_of, message_id)
                if eval_id then
                    local attempt = message_id .. "#" .. redis.call("hincrby", deliveries, message_id, 1)
                    local fields = {started_at = started_at, worker = worker_name, next_retry_at = "",
                                    attempt = attempt}
                    local done = transition(ns, eval_id, "running", now, "queued,running", fields, {}, "0", bounds)
                    mark = done[1] == 1 and "+" .. attempt or "=" .. done[2]
                end
                taken[#taken + 1] = data
                taken[#taken + 1] = mark
            end
        end
        for _, message_id in ipairs(deferred) do
            redis.call("rpush", queue, message_id)
        end
    end
    return taken

elseif command == "heartbeat" then
    redis.call("zadd", heartbeats, now, worker_id)
    maintain()
    return 1

elseif command == "ack" then
    local message_id = claim(ARGV[4])
    if message_id then
        forget(message_id)
    end
    return 1

elseif command == "nack" then
    -- args: the delivery's attempt token, its dead-letter entry (JSON); entry and removal happen together
    local message_id, entry = claim(ARGV[4]), ARGV[5]
    if message_id then
        local task_id = redis.call("hget", tasks, message_id) or message_id
        redis.call("zadd", ns .. ":dlq", now, task_id)
        redis.call("hset", ns .. ":dlq:entries", task_id, entry)
        forget(message_id)
    end
    return 1

elseif command == "requeue" then
    -- args: attempt tokens of deliveries this worker fetched but will not run (shutdown), in order
    for i = #ARGV, 4, -1 do
        local message_id = claim(ARGV[i])
        if message_id then  -- not one fetched again since (this worker was taken for dead)
            return_to_head(message_id, true)
        end
    end
    return 1

elseif command == "leave" then
    -- a worker shutting down cleanly: hand back anything unacked and stop being tracked
    return release(worker_id, true)

elseif command == "sweep" then
    -- args: "eval_of" or "deliveries", an HSCAN cursor, a page size. Drops that hash's entries
    -- of messages that no longer exist: workers of a release before these hashes forgot
    -- messages without them. Returns {next cursor ("0": done), entries dropped}.
    local hash = ({eval_of = eval_of, deliveries = deliveries})[ARGV[4]]
    if not hash then
        return redis.error_reply("sweep: unknown hash " .. tostring(ARGV[4]))
    end
    local page = redis.call("hscan", hash, ARGV[5], "COUNT", ARGV[6])
    local dropped = 0
    for i = 1, #page[2], 2 do
        local message_id = page[2][i]
        if redis.call("hexists", msgs, message_id) == 0 then
            dropped = dropped + redis.call("hdel", hash, message_id)
        end
    end
    return {page[1], dropped}

elseif command == "sizes" then
    -- ready count per level, then delayed, then in flight across workers
    local out = {}
    for i = 4, #ARGV do
        out[#out + 1] = redis.call("llen", queue_key(ARGV[i]))
    end
    out[#out + 1] = redis.call("zcard", delayed)
    local in_flight = 0
    for _, worker in ipairs(redis.call("zrange", heartbeats, 0, -1)) do
        in_flight = in_flight + redis.call("scard", acks_key(worker))
    end
    out[#out + 1] = in_flight
    return out
end

return redis.error_reply("unknown command " .. tostring(command))
