-- transition(): move one evaluation to a new status, atomically, only from the statuses allowed.
-- A function, so the broker's scripts (actors/lua/dispatch.lua: a fetch marks what it takes
-- running) change statuses exactly as transition.lua does alone.
--
-- transition(ns, eval_id, new_status, now_ms, allowed_from_csv, fields, expect, final, bounds)
-- allowed_from_csv lists statuses; "running+next_retry_at" allows "running" only while that
-- field is set (non-empty). Fields given as "" are cleared. expect ({} for none) names
-- fields that must hold exactly these values (a run's attempt token, so a superseded delivery
-- cannot write its result over the current one's).
-- fields and expect are tables; bounds lists the histograms' bucket bounds (ms).
-- final is "1" when new_status is a final one: it is then counted in $ns:stats, by queue
-- system and by language, and its submit-to-result latency is kept in $ns:latency:$system.
-- Returns {1, new_status} when done, {0, current_status} when refused ("" if no such record).
--
-- $ns:eval:$id          hash, the evaluation record
-- $ns:eval:$id:events   list of JSON status changes (the timeline)
-- $ns:evals             zset eval id -> created (ms): every evaluation
-- $ns:evals:$status     zset eval id -> created (ms): evaluations by status
-- $ns:stats            hash of counters ("final:<system>:<status>", "language:<lang>:<status>";
--                      for a submission with test cases "verdict:<verdict>", "case:<status>")
-- $ns:latency:$system  list of the latest latencies in ms, newest first
-- $ns:hist:wait_ms     histogram ("in:<ms>": how many fell in the bucket up to that bound and
--                      above the one before, "in:+Inf", sum, count) of queue waits:
--                      from entering the queue (queued_at_ms) to starting
-- $ns:hist:run_ms      histogram of run times (the final change's runtime_ms)
-- Latency is from submission (submitted_at_ms: creation, or a retry from the DLQ) to result.
-- $ns:bucket:$owner    the submitting key's token bucket (quota.lua): a finished submission with
--                      test cases owes one token more for each case that ran after the first
--                      ("debt", paid at the key's next submission)
-- $ns:minute:$n        per minute n (ms / 60000): final statuses and a latency bucket each
--                      ("lat:<ms>"), kept two hours, for rates and percentiles over the last hour
-- channels $ns:events and $ns:events:$id   each change is published to both as JSON
-- $ns:results:celery:$backend       hash Celery result key -> "<seq> <meta JSON>": the latest
--                                   record of each task whose producer's results live in another
--                                   Redis or database ($backend, see write_celery_meta), until
--                                   app/celery/results.py has written it there
-- $ns:results:celery:$backend:due   list of those keys, pushed at each change (the relay's wake-up)
-- $ns:callbacks:due    zset "<eval_id> <final at ms>" -> when due (ms): a finished evaluation
--                      with a webhook (`callback_url`), to be sent by actors/callbacks.py
-- $ns:callbacks:bell   list rung with each one, so a relay wakes at once

local LATENCY_SAMPLES = 1000
-- Celery's result backend (app/celery/ingress.py): an evaluation taken from a Celery producer
-- carries `celery_meta`, the key its producer's AsyncResult reads; each change writes it
-- as Celery's RedisBackend does (the JSON meta, kept a day, published on a channel of that name).
-- When the producer's results live elsewhere (`CELERY_RESULT_BACKEND`: another database or
-- another Redis), the record carries `celery_results` (that backend's id) and the meta goes, in
-- this same atomic call, to that backend's outbox with a sequence number of its own; the relay
-- (app/celery/results.py) writes it there, never a lower number over a higher one.
local CELERY_RESULT_EXPIRES_S = 86400
local CELERY_STATES = {queued = "PENDING", running = "STARTED", completed = "SUCCESS", timeout = "SUCCESS",
    memory_limit_exceeded = "SUCCESS", output_limit_exceeded = "SUCCESS", compile_error = "SUCCESS",
    failed = "FAILURE", cancelled = "REVOKED"}
local CELERY_RESULT_FIELDS = {"status", "output", "error", "exit_code", "runtime_ms", "output_truncated"}

-- ISO 8601 (UTC, microseconds) of `ms` since the epoch, as Celery's date_done.
local function iso_utc(ms)
    local seconds = math.floor(ms / 1000)
    local days = math.floor(seconds / 86400)
    local rest = seconds - days * 86400
    -- civil date from days since 1970-01-01 (Howard Hinnant's algorithm)
    local z = days + 719468
    local era = math.floor(z / 146097)
    local doe = z - era * 146097
    local yoe = math.floor((doe - math.floor(doe / 1460) + math.floor(doe / 36524) - math.floor(doe / 146096)) / 365)
    local doy = doe - (365 * yoe + math.floor(yoe / 4) - math.floor(yoe / 100))
    local mp = math.floor((5 * doy + 2) / 153)
    local day = doy - math.floor((153 * mp + 2) / 5) + 1
    local month = mp < 10 and mp + 3 or mp - 9
    local year = yoe + era * 400 + (month <= 2 and 1 or 0)
    return string.format("%04d-%02d-%02dT%02d:%02d:%02d.%06d", year, month, day, math.floor(rest / 3600),
        math.floor(rest % 3600 / 60), rest % 60, (ms % 1000) * 1000)
end

local function write_celery_meta(ns, record, eval_id, new_status, now)
    local key = redis.call("hget", record, "celery_meta")
    local state = CELERY_STATES[new_status]
    if not key or key == "" or not state or state == "PENDING" then return end
    local task_id = string.sub(key, string.len("celery-task-meta-") + 1)
    local meta = {status = state, traceback = cjson.null, children = {}, task_id = task_id,
        date_done = cjson.null, result = cjson.null}
    if state == "STARTED" then
        meta.result = {hostname = redis.call("hget", record, "worker") or "", pid = cjson.null}
    else
        meta.date_done = iso_utc(tonumber(now))
    end
    if state == "SUCCESS" then
        local result = {eval_id = eval_id}
        for _, name in ipairs(CELERY_RESULT_FIELDS) do
            local value = redis.call("hget", record, name)
            if name == "exit_code" or name == "runtime_ms" then value = tonumber(value) or cjson.null
            elseif name == "output_truncated" then value = value == "1" or value == "true"
            elseif name == "status" then value = new_status
            else value = value or "" end
            result[name] = value
        end
        local total = redis.call("hget", record, "total")
        if total and total ~= "" then  -- a submission with test cases: its verdict and cases too
            result.verdict = redis.call("hget", record, "verdict")
            result.passed = tonumber(redis.call("hget", record, "passed"))
            result.total = tonumber(total)
            local ok, cases = pcall(cjson.decode, redis.call("hget", record, "cases") or "[]")
            result.cases = ok and cases or {}
        end
        meta.result = result
    elseif state == "FAILURE" then
        local error = redis.call("hget", record, "error") or "evaluation failed"
        meta.result = {exc_type = "RuntimeError", exc_module = "builtins", exc_message = {error}}
        meta.traceback = error
    elseif state == "REVOKED" then
        meta.result = {exc_type = "TaskRevokedError", exc_module = "celery.exceptions",
            exc_message = {redis.call("hget", record, "error") or "cancelled"}}
    end
    local encoded = cjson.encode(meta)
    local backend = redis.call("hget", record, "celery_results")
    if backend and backend ~= "" then
        local seq = redis.call("hincrby", record, "celery_seq", 1)
        local outbox = ns .. ":results:celery:" .. backend
        redis.call("hset", outbox, key, seq .. " " .. encoded)
        redis.call("rpush", outbox .. ":due", key)
        return
    end
    redis.call("set", key, encoded, "EX", CELERY_RESULT_EXPIRES_S)
    redis.call("publish", key, encoded)
end

local function bucket(bounds, value)
    for _, bound in ipairs(bounds) do
        if value <= bound then return tostring(bound) end
    end
    return "+Inf"
end

-- One counter per bucket (the reader adds them up into Prometheus's cumulative ones): three
-- writes per observation rather than one per bound.
local function observe(bounds, hist, value)
    redis.call("hincrby", hist, "in:" .. bucket(bounds, value), 1)
    redis.call("hincrbyfloat", hist, "sum", value)
    redis.call("hincrby", hist, "count", 1)
end

-- A finishing change's test cases (a list), or nil: one that does not decode is left out of
-- the counts rather than refusing the result.
local function cases_of(fields)
    if not fields["cases"] then return nil end
    local ok, cases = pcall(cjson.decode, fields["cases"])
    if ok and type(cases) == "table" then return cases end
    return nil
end

local function transition(ns, eval_id, new_status, now, allowed_csv, fields, expect, final, bounds)
    local record = ns .. ":eval:" .. eval_id
    local current = redis.call("hget", record, "status")
    if not current then
        return {0, ""}
    end
    local allowed = false
    for rule in string.gmatch(allowed_csv, "[^,]+") do
        local status, needed = string.match(rule, "^([^+]+)%+?(.*)$")
        if status == current then
            if needed == "" then
                allowed = true
            else
                local value = redis.call("hget", record, needed)
                if value and value ~= "" then allowed = true end
            end
        end
    end
    for field, value in pairs(expect) do
        if (redis.call("hget", record, field) or "") ~= value then allowed = false end
    end
    if not allowed then
        return {0, current}
    end

    local flat = {"status", new_status}
    for key, value in pairs(fields) do
        flat[#flat + 1] = key
        flat[#flat + 1] = tostring(value)
    end
    redis.call("hset", record, unpack(flat))

    local created = redis.call("zscore", ns .. ":evals", eval_id) or now
    redis.call("zrem", ns .. ":evals:" .. current, eval_id)
    redis.call("zadd", ns .. ":evals:" .. new_status, created, eval_id)

    -- Shadow copies (runs compared across systems while migrating) stay out of every counter.
    local counted = not redis.call("hget", record, "shadow_of")
    local function since(field)
        local at = tonumber(redis.call("hget", record, field)) or tonumber(created)
        return math.max(0, tonumber(now) - at)
    end
    local since_submitted = since("submitted_at_ms")
    if counted and new_status == "running" and current == "queued" then
        observe(bounds, ns .. ":hist:wait_ms", since("queued_at_ms"))
    end
    if new_status == "queued" then
        redis.call("hset", record, "queued_at_ms", now)
    end
    -- $ns:active:$owner: the submitting key's evaluations that are queued or running (its quota)
    local owner = redis.call("hget", record, "owner")
    local cases = cases_of(fields)  -- a finishing submission's test cases, decoded once
    -- $ns:running:$owner: those of them running now, not waiting for a retry: the broker's
    -- fetch holds a key to its `max_running`
    if owner then
        local waiting = redis.call("hget", record, "next_retry_at")
        if new_status == "running" and (not waiting or waiting == "") then
            redis.call("sadd", ns .. ":running:" .. owner, eval_id)
        else
            redis.call("srem", ns .. ":running:" .. owner, eval_id)
        end
    end
    if owner and final == "1" then
        redis.call("srem", ns .. ":active:" .. owner, eval_id)
        -- $ns:stored:$owner:$hour: bytes the key's finished evaluations stored this hour (its
        -- code, output and error), which its stored-bytes quota (quota.lua) is held to
        local stored = ns .. ":stored:" .. owner .. ":" .. math.floor(tonumber(now) / 3600000)
        local bytes = (tonumber(redis.call("hget", record, "code_bytes")) or 0)
            + string.len(tostring(fields["output"] or "")) + string.len(tostring(fields["error"] or ""))
            + string.len(tostring(fields["cases"] or ""))
        redis.call("incrby", stored, bytes)
        redis.call("expire", stored, 7200)
        -- $ns:bucket:$owner: a submission paid one token when it was taken (quota.lua); one
        -- with test cases pays for every further case that ran now, so the key's rate counts
        -- runs (the bucket may go below zero: its next submissions wait until it refills)
        local ran = 0
        for _, case in ipairs(cases or {}) do
            if type(case) == "table" and case["status"] ~= "skipped" then ran = ran + 1 end
        end
        if ran > 1 then  -- owed, paid at the key's next submission (quota.lua's take)
            local owed = ns .. ":bucket:" .. owner
            redis.call("hincrbyfloat", owed, "debt", ran - 1)
            if redis.call("pttl", owed) < 3600000 then redis.call("pexpire", owed, 3600000) end
        end
    elseif owner and new_status == "queued" then
        redis.call("sadd", ns .. ":active:" .. owner, eval_id)
    end
    if counted and final == "1" then
        local system = redis.call("hget", record, "queue_system") or "dramatiq"
        local language = redis.call("hget", record, "language") or "unknown"
        redis.call("hincrby", ns .. ":stats", "final:" .. system .. ":" .. new_status, 1)
        redis.call("hincrby", ns .. ":stats", "language:" .. language .. ":" .. new_status, 1)
        -- a submission with test cases: its verdict, and its cases by status (one write per
        -- status seen; a case list that does not decode is not counted, never refused)
        local verdict = fields["verdict"]
        if verdict and verdict ~= "" then
            redis.call("hincrby", ns .. ":stats", "verdict:" .. verdict, 1)
            local by_status = {}
            for _, case in ipairs(cases or {}) do
                local status = type(case) == "table" and case["status"]
                if type(status) == "string" then by_status[status] = (by_status[status] or 0) + 1 end
            end
            for status, count in pairs(by_status) do
                redis.call("hincrby", ns .. ":stats", "case:" .. status, count)
            end
        end
        redis.call("lpush", ns .. ":latency:" .. system, since_submitted)
        redis.call("ltrim", ns .. ":latency:" .. system, 0, LATENCY_SAMPLES - 1)
        if tonumber(fields["runtime_ms"]) then
            observe(bounds, ns .. ":hist:run_ms", tonumber(fields["runtime_ms"]))
        end
        local minute = ns .. ":minute:" .. math.floor(tonumber(now) / 60000)
        redis.call("hincrby", minute, new_status, 1)
        redis.call("hincrby", minute, "lat:" .. bucket(bounds, since_submitted), 1)
        redis.call("expire", minute, 7200)
    end

    -- a finished evaluation with a webhook: its result is due to be sent (actors/callbacks.py)
    if final == "1" then
        local callback = redis.call("hget", record, "callback_url")
        if callback and callback ~= "" then
            redis.call("zadd", ns .. ":callbacks:due", now, eval_id .. " " .. now)
            redis.call("hset", record, "callback_status", "due", "callback_due_at", now, "callback_attempts", 0,
                "callback_last_error", "")
            redis.call("rpush", ns .. ":callbacks:bell", "1")
            redis.call("ltrim", ns .. ":callbacks:bell", -64, -1)
        end
    end

    fields["eval_id"] = eval_id
    fields["status"] = new_status
    fields["previous_status"] = current
    fields["at_ms"] = tonumber(now)
    fields["output"] = nil
    fields["error"] = nil
    if cases then  -- the timeline records each case, without its output and error
        for _, case in ipairs(cases) do
            if type(case) == "table" then
                case["output"] = nil
                case["error"] = nil
            end
        end
        fields["cases"] = cjson.encode(cases)
    end
    write_celery_meta(ns, record, eval_id, new_status, now)
    local event = cjson.encode(fields)
    redis.call("rpush", record .. ":events", event)
    redis.call("publish", ns .. ":events", event)
    redis.call("publish", ns .. ":events:" .. eval_id, event)
    return {1, new_status}
end
