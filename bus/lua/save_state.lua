-- Write fields of a session's state, fenced by the partition lease: a group's own state, or
-- the shared fields a handler writes (a stale owner's writes are refused); a retired
-- session's state keeps the session's expiry. KEYS: lease state meta  ARGV: token field value...
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return redis.error_reply('FENCED lease of ' .. KEYS[1] .. ' is not ' .. ARGV[1])
end
-- A session whose meta is gone (lost with the server's data) would get a state that never
-- expires.
if redis.call('EXISTS', KEYS[3]) == 0 then return redis.error_reply('NOSESSION') end
redis.call('HSET', KEYS[2], unpack(ARGV, 2))
local ttl = redis.call('PTTL', KEYS[3])
if ttl > 0 then redis.call('PEXPIRE', KEYS[2], ttl) end
return 1
