-- shed.lua: one bounded step of making room in a nearly full Redis (infra/redis_memory.py runs
-- it while used memory is past CRUCIBLE_REDIS_SHED_SHARE of maxmemory). Cheapest to lose first:
--
-- 1. the `limit` oldest finished evaluations created at or before cutoff_ms (the minimum
--    retention ago), oldest first over every final status: record, timeline and index entries,
--    as the hourly clean-up removes them. Never one whose webhook is still to be sent
--    (callback_status waiting, due or retrying), nor one whose shadow comparison is pending:
--    those are passed over (looking at no more than 4 x limit records in one step).
-- 2. only when step 1 found none: the outputs and errors longer than trim_bytes of the next
--    `limit` finished evaluations (by creation, from where the last step stopped) are cut to
--    trim_bytes (at a UTF-8 character boundary) and flagged output_truncated / error_truncated.
--
-- Queued and running evaluations are never touched: only the final statuses' indexes are read.
--
-- ARGV: ns, cutoff_ms, limit, trim_bytes (0: no trimming), final statuses (comma-separated),
--       every status (comma-separated)
-- Returns {removed, trimmed, bytes_trimmed, more}: more is 1 when step 2 stopped at `limit`
-- records (there may be more to look at); all 0 when nothing was left to shed.
--
-- $ns:eval:$id            hash, the evaluation record (deleted, or its output and error trimmed)
-- $ns:eval:$id:events     list, its timeline (deleted with it)
-- $ns:evals               zset eval id -> created (ms): every evaluation
-- $ns:evals:$status       zset eval id -> created (ms): evaluations by status
-- $ns:evals:owner:$owner  zset eval id -> created (ms): one API key's evaluations
-- $ns:shadow:pending      set: evaluations whose shadow copy is not yet compared (kept)
-- $ns:shed:trimmed        string: creation time (ms) up to which outputs were trimmed
-- $ns:stats               hash: "shed:removed", "shed:trimmed" count what was shed

local ns = ARGV[1]
local cutoff = tonumber(ARGV[2])
local limit = tonumber(ARGV[3])
local trim_bytes = tonumber(ARGV[4])
local finals, statuses = {}, {}
for s in string.gmatch(ARGV[5], "[^,]+") do finals[#finals + 1] = s end
for s in string.gmatch(ARGV[6], "[^,]+") do statuses[#statuses + 1] = s end

-- the `limit` oldest finished evaluations with a creation time in (low, high], oldest first
local function oldest_finished(low, high)
    local found = {}
    for _, status in ipairs(finals) do
        local rows = redis.call("zrangebyscore", ns .. ":evals:" .. status, low, high, "WITHSCORES", "LIMIT", 0, limit)
        for i = 1, #rows, 2 do
            found[#found + 1] = {rows[i], tonumber(rows[i + 1]), rows[i + 1]}
        end
    end
    table.sort(found, function(a, b) return a[2] < b[2] end)
    local out = {}
    for i = 1, math.min(limit, #found) do out[i] = found[i] end
    return out
end

local KEEP_CALLBACK = {waiting = true, due = true, retrying = true}

-- whether a finished evaluation may go now (a record already gone leaves only index entries)
local function sheddable(eval_id, fields)
    local callback_pending = fields[3] and fields[3] ~= "" and KEEP_CALLBACK[fields[4] or "waiting"]
    local finished = not fields[1]
    for _, s in ipairs(finals) do
        if fields[1] == s then finished = true end
    end
    return finished and not callback_pending and redis.call("sismember", ns .. ":shadow:pending", eval_id) == 0
end

-- Oldest first over every final status; one that must stay is passed over (each status's
-- index is then read from past those), looking at no more than 4 x limit records in all.
local removed, examined, kept = 0, 0, {}
while removed < limit and examined < 4 * limit do
    local found = {}
    for _, status in ipairs(finals) do
        local rows = redis.call("zrangebyscore", ns .. ":evals:" .. status, "-inf", cutoff, "WITHSCORES",
            "LIMIT", kept[status] or 0, limit - removed)
        for i = 1, #rows, 2 do
            found[#found + 1] = {rows[i], tonumber(rows[i + 1]), status}
        end
    end
    if #found == 0 then break end
    table.sort(found, function(a, b) return a[2] < b[2] end)
    for i = 1, math.min(limit - removed, #found) do
        local eval_id, status = found[i][1], found[i][3]
        local record = ns .. ":eval:" .. eval_id
        local fields = redis.call("hmget", record, "status", "owner", "callback_url", "callback_status")
        examined = examined + 1
        if sheddable(eval_id, fields) then
            redis.call("del", record, record .. ":events")
            redis.call("zrem", ns .. ":evals", eval_id)
            for _, s in ipairs(statuses) do
                redis.call("zrem", ns .. ":evals:" .. s, eval_id)
            end
            if fields[2] and fields[2] ~= "" then
                redis.call("zrem", ns .. ":evals:owner:" .. fields[2], eval_id)
            end
            removed = removed + 1
        else
            kept[status] = (kept[status] or 0) + 1
        end
    end
end
if removed > 0 then
    redis.call("hincrby", ns .. ":stats", "shed:removed", removed)
    return {removed, 0, 0, 0}
end
if trim_bytes <= 0 then
    return {0, 0, 0, 0}
end

-- `text` cut to at most `size` bytes, not inside a UTF-8 character
local function cut(text, size)
    local n = size
    while n > 0 do
        local byte = string.byte(text, n + 1)
        if not byte or byte < 128 or byte >= 192 then break end
        n = n - 1
    end
    return string.sub(text, 1, n)
end

local cursor_key = ns .. ":shed:trimmed"
local cursor = redis.call("get", cursor_key)
local trimmed, bytes = 0, 0
local rows = oldest_finished(cursor and ("(" .. cursor) or "-inf", "+inf")
for _, row in ipairs(rows) do
    local record = ns .. ":eval:" .. row[1]
    local values = redis.call("hmget", record, "output", "error")
    local changed = false
    for i, name in ipairs({"output", "error"}) do
        local text = values[i]
        if text and string.len(text) > trim_bytes then
            local kept = cut(text, trim_bytes)
            bytes = bytes + string.len(text) - string.len(kept)
            redis.call("hset", record, name, kept, name .. "_truncated", "1")
            changed = true
        end
    end
    if changed then trimmed = trimmed + 1 end
end
if #rows > 0 then
    redis.call("set", cursor_key, rows[#rows][3])
end
if trimmed > 0 then
    redis.call("hincrby", ns .. ":stats", "shed:trimmed", trimmed)
end
return {0, trimmed, bytes, #rows == limit and 1 or 0}
