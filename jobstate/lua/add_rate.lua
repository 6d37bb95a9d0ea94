-- One rate sample into a model's rates hash (KEYS[1]), for the shape ARGV[1]: ARGV[2] items that cost
-- ARGV[3] UNet evaluations in ARGV[4] seconds. Past ARGV[5] items a shape's three sums are halved
-- together: their ratios, the rate, stay as they were, and older work weighs less with each halving,
-- so the rate follows a model's workers when their hardware or settings change.
local shape = ARGV[1]
local items = redis.call('HINCRBY', KEYS[1], shape .. '|items', ARGV[2])
local evaluations = redis.call('HINCRBY', KEYS[1], shape .. '|evaluations', ARGV[3])
local seconds = tonumber(redis.call('HINCRBYFLOAT', KEYS[1], shape .. '|seconds', ARGV[4]))
if items > tonumber(ARGV[5]) then
  redis.call('HSET', KEYS[1],
    shape .. '|items', math.floor(items / 2),
    shape .. '|evaluations', math.floor(evaluations / 2),
    shape .. '|seconds', string.format('%.17g', seconds / 2))
end
return items
