-- transition(keys=[namespace], args=[eval_id, new_status, now_ms, allowed_from_csv, fields_json,
--                                   expect_json, final, bucket_bounds_csv])
-- status.lua's transition() (prepended), alone: see there for what each argument means.
local bounds = {}
for bound in string.gmatch(ARGV[8], "[^,]+") do bounds[#bounds + 1] = tonumber(bound) end
return transition(KEYS[1], ARGV[1], ARGV[2], ARGV[3], ARGV[4], cjson.decode(ARGV[5]),
                  cjson.decode(ARGV[6]), ARGV[7], bounds)
