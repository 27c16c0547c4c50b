-- Count one finished root-to-leaf path, exactly once per leaf id, in one atomic step.
-- KEYS[1] leaf marker, KEYS[2] leaves counter, KEYS[3] n_states counter,
-- KEYS[4] truncated set, KEYS[5] duplicate counter, KEYS[6] the rollout's seen hash (used only
-- when counting per rollout), KEYS[7..] state hashes (unique, root first)
-- ARGV[1] success (0|1), ARGV[2] marker ttl seconds (0: keep), ARGV[3] xi, ARGV[4] zeta, ARGV[5] eps,
-- ARGV[6] truncate_won (0|1), ARGV[7] count per rollout (0|1)
-- Returns {counted (0|1), leaves after}.
-- Mirror of score_math.count_leaf (counts) and score_math.is_truncated (the truncated set).
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
local truncate_won = tonumber(ARGV[6] or '1') == 1
local per_rollout = tonumber(ARGV[7] or '0') == 1
local seen_key = KEYS[6]

-- Same rule as score_math.is_truncated (roots are handled by the caller below).
local function hopeless(n, s)
  if n == 0 then return false end
  if (not truncate_won) and s > 0 then return false end
  return (n - s) >= xi and (s / (n + eps)) <= zeta
end

local seen = {}
for i = 7, #KEYS do
  local k = KEYS[i]
  if not seen[k] then
    seen[k] = true
    -- How much this leaf adds to n and s of k: 1 and success per leaf; per rollout, n only on the
    -- rollout's first leaf through k and s only on its first winning leaf through k.
    local dn, ds = 1, success
    if per_rollout then
      local mark = redis.call('HGET', seen_key, k)
      if not mark then
        redis.call('HSET', seen_key, k, success)
      elseif success == 1 and mark == '0' then
        dn = 0
        redis.call('HSET', seen_key, k, 1)
      else
        dn, ds = 0, 0
      end
    end
    local n
    if dn == 1 then
      n = redis.call('HINCRBY', k, 'n', 1)
      if n == 1 then redis.call('INCR', KEYS[3]) end
    else
      n = tonumber(redis.call('HGET', k, 'n') or '0')
    end
    if ds == 1 then redis.call('HINCRBY', k, 's', 1) end
    if i == 7 then
      -- A task's root is never truncated.
      redis.call('HSET', k, 'r', 1)
      redis.call('SREM', KEYS[4], k)
    elseif dn == 1 or ds == 1 then
      local v = redis.call('HMGET', k, 's', 'r')
      if not v[2] then
        local s = tonumber(v[1] or '0')
        -- Touch the set only when the state crosses the truncation boundary.
        local now, before = hopeless(n, s), hopeless(n - dn, s - ds)
        if now and not before then
          redis.call('SADD', KEYS[4], k)
        elseif before and not now then
          redis.call('SREM', KEYS[4], k)
        end
      end
    end
  end
end
if per_rollout and ttl > 0 then redis.call('EXPIRE', seen_key, ttl) end
return {1, redis.call('INCR', KEYS[2])}
