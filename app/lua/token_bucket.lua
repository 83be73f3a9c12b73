-- Take `cost` tokens from one key's bucket, atomically, on Redis's clock.
--
-- token_bucket(keys=[bucket], args=[rate_per_s, burst, cost])
-- The bucket (hash: tokens, at_ms) refills at rate_per_s up to burst. Returns
-- {allowed (1/0), tokens left (floor), ms until `cost` tokens are there (0 if allowed),
--  ms until the bucket is full}.

local bucket = KEYS[1]
local rate, burst, cost = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local time = redis.call("TIME")
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)

local stored = redis.call("hmget", bucket, "tokens", "at_ms")
local tokens = tonumber(stored[1]) or burst
local at = tonumber(stored[2]) or now
tokens = math.min(burst, tokens + math.max(0, now - at) * rate / 1000)

local allowed = 0
local wait_ms = 0
if cost <= tokens then
    tokens = tokens - cost
    allowed = 1
else
    wait_ms = math.ceil((cost - tokens) * 1000 / rate)
end
redis.call("hset", bucket, "tokens", tostring(tokens), "at_ms", now)
redis.call("pexpire", bucket, math.ceil(burst * 1000 / rate) + 1000)
return {allowed, math.floor(tokens), wait_ms, math.ceil((burst - tokens) * 1000 / rate)}
