-- Write a group's own state of a session, fenced by the partition lease; a retired session's
-- state keeps the session's expiry. KEYS: lease state meta  ARGV: token field value
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return redis.error_reply('FENCED lease of ' .. KEYS[1] .. ' is not ' .. ARGV[1])
end
redis.call('HSET', KEYS[2], ARGV[2], ARGV[3])
local ttl = redis.call('PTTL', KEYS[3])
if ttl > 0 then redis.call('PEXPIRE', KEYS[2], ttl) end
return 1
