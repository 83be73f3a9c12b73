-- quota(keys=[bucket, active, stored], args=[rate_per_s, burst, max_active, stored_limit,
-- eval_id...]): admit()
-- from quota.lua (prepended), alone: a batch's quota is taken before its items are submitted.
local time = redis.call("TIME")
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
return admit(KEYS[1], KEYS[2], tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]),
             {unpack(ARGV, 5)}, now, KEYS[3], ARGV[4])
