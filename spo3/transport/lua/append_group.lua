-- Append one group to the groups stream, idempotent per group id and bounded by waiting.
-- KEYS[1] stream, KEYS[2] group-id marker; ARGV[1] payload, ARGV[2] marker ttl, ARGV[3] max len,
-- ARGV[4] max unread (0: no bound), ARGV[5] the learner's consumer group.
-- Returns the entry id, "" if the group id was appended before, or "FULL".
-- Unread = length - delivered-but-unacknowledged (acknowledged entries are deleted); before the
-- learner made its consumer group, every entry is unread.
local len = redis.call('XLEN', KEYS[1])
if len >= tonumber(ARGV[3]) then return 'FULL' end
if tonumber(ARGV[4]) > 0 then
  local pending = redis.pcall('XPENDING', KEYS[1], ARGV[5])
  local delivered = 0
  if type(pending) == 'table' and not pending['err'] then delivered = tonumber(pending[1]) end
  if len - delivered >= tonumber(ARGV[4]) then return 'FULL' end
end
if not redis.call('SET', KEYS[2], '1', 'NX', 'EX', tonumber(ARGV[2])) then return '' end
return redis.call('XADD', KEYS[1], '*', 'group', ARGV[1])
