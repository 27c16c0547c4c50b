-- Count one finished root-to-leaf path, exactly once per leaf id, in one atomic step.
-- KEYS[1] leaf marker, KEYS[2] leaves counter, KEYS[3] n_states counter,
-- KEYS[4] truncated set, KEYS[5] duplicate counter, KEYS[6..] state hashes (unique, root first)
-- ARGV[1] success (0|1), ARGV[2] marker ttl seconds (0: keep), ARGV[3] xi, ARGV[4] zeta, ARGV[5] eps
-- Returns {counted (0|1), leaves after}.
local ttl = tonumber(ARGV[2])
local fresh
if ttl > 0 then
  fresh = redis.call('SET', KEYS[1], '1', 'NX', 'EX', ttl)
else
  fresh = redis.call('SET', KEYS[1], '1', 'NX')
end
if not fresh then
  redis.call('INCR', KEYS[5])
  return {0, tonumber(redis.call('GET', KEYS[2]) or '0')}
end

local success = tonumber(ARGV[1])
local xi = tonumber(ARGV[3])
local zeta = tonumber(ARGV[4])
local eps = tonumber(ARGV[5])

-- Same rule as score_math.is_truncated (roots are handled by the caller below).
local function hopeless(n, s)
  return (n - s) >= xi and (s / (n + eps)) <= zeta
end

local seen = {}
for i = 6, #KEYS do
  local k = KEYS[i]
  if not seen[k] then
    seen[k] = true
    local n = redis.call('HINCRBY', k, 'n', 1)
    if n == 1 then redis.call('INCR', KEYS[3]) end
    if success == 1 then redis.call('HINCRBY', k, 's', 1) end
    if i == 6 then
      -- A task's root is never truncated.
      redis.call('HSET', k, 'r', 1)
      redis.call('SREM', KEYS[4], k)
    else
      local v = redis.call('HMGET', k, 's', 'r')
      if not v[2] then
        local s = tonumber(v[1] or '0')
        -- Touch the set only when the state crosses the truncation boundary.
        local now, before = hopeless(n, s), (n > 1 and hopeless(n - 1, s - success))
        if now and not before then
          redis.call('SADD', KEYS[4], k)
        elseif before and not now then
          redis.call('SREM', KEYS[4], k)
        end
      end
    end
  end
end
return {1, redis.call('INCR', KEYS[2])}
