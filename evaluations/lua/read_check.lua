-- reads(keys=[bucket], args=[rate_per_s, burst, cost]): take() from quota.lua (prepended), for
-- a key's reads (listings, records, timelines, streams opened): a bucket of its own, cheaper
-- than submissions', so reading cannot be used to load the API and Redis without bound.
local time = redis.call("TIME")
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
return take(KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), now)
