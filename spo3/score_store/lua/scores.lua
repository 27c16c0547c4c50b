-- Read counts of many states and the trajectory counter as one consistent snapshot.
-- KEYS[1] leaves counter, KEYS[2..] state hashes. Returns {leaves, n1, s1, r1, n2, s2, r2, ...}.
local out = {tonumber(redis.call('GET', KEYS[1]) or '0')}
for i = 2, #KEYS do
  local v = redis.call('HMGET', KEYS[i], 'n', 's', 'r')
  out[#out + 1] = tonumber(v[1] or '0')
  out[#out + 1] = tonumber(v[2] or '0')
  out[#out + 1] = tonumber(v[3] or '0')
end
return out
