-- Admit submissions for one API key, atomically, on Redis's clock: the in-progress cap, then
-- the token bucket, then the new evaluations are counted as in progress. A function, so the
-- broker's `submit` (actors/lua/dispatch.lua) admits and enqueues in one call; quota_check.lua
-- calls it alone (batches).
--
-- admit(bucket, active, rate_per_s, burst, max_active, eval_ids, now_ms, stored, stored_limit)
-- bucket: hash (tokens, at_ms), refilled at rate_per_s up to burst; each eval_id costs one.
-- active: set of the key's evaluations queued or running (status.lua's transition() removes the
-- finished).
-- stored: prefix of the key's stored-bytes counters (status.lua counts finished evaluations'
-- bytes per hour); stored_limit: bytes it may store in an hour (0: no limit).
-- Returns {1, tokens left, ms until full} when admitted (ids added to active),
--         {0, "active", how many are in progress}, {0, "stored", bytes stored this hour}
--         or {0, "rate", ms until enough tokens}.
-- take(bucket, rate_per_s, burst, cost, now_ms): a token bucket, refilled at rate_per_s up to
-- burst. Returns {1, tokens left, ms until full} or {0, "rate", ms until enough tokens}.
local function take(bucket, rate, burst, cost, now)
    local stored = redis.call("hmget", bucket, "tokens", "at_ms", "debt")
    local tokens = tonumber(stored[1]) or burst
    local at = tonumber(stored[2]) or now
    -- debt: tokens owed by finished submissions' further test cases (status.lua), paid now
    tokens = math.min(burst, tokens + math.max(0, now - at) * rate / 1000) - (tonumber(stored[3]) or 0)
    if cost > tokens then
        redis.call("hset", bucket, "tokens", tostring(tokens), "at_ms", now, "debt", 0)
        redis.call("pexpire", bucket, math.ceil((burst - tokens) * 1000 / rate) + 1000)
        return {0, "rate", math.ceil((cost - tokens) * 1000 / rate)}
    end
    tokens = tokens - cost
    redis.call("hset", bucket, "tokens", tostring(tokens), "at_ms", now, "debt", 0)
    redis.call("pexpire", bucket, math.ceil(burst * 1000 / rate) + 1000)
    return {1, math.floor(tokens), math.ceil((burst - tokens) * 1000 / rate)}
end

local function admit(bucket, active, rate, burst, max_active, eval_ids, now, stored, stored_limit)
    local cost = #eval_ids
    local in_progress = redis.call("scard", active)
    if in_progress + cost > max_active then
        return {0, "active", in_progress}
    end
    if stored and tonumber(stored_limit) and tonumber(stored_limit) > 0 then
        local used = tonumber(redis.call("get", stored .. ":" .. math.floor(now / 3600000))) or 0
        if used >= tonumber(stored_limit) then
            return {0, "stored", used}
        end
    end
    local taken = take(bucket, rate, burst, cost, now)
    if taken[1] == 1 then
        redis.call("sadd", active, unpack(eval_ids))
    end
    return taken
end
