-- Write application fields of a session's state (unfenced: last writer wins per field); a
-- retired session's state keeps the session's expiry. KEYS: state meta  ARGV: field value...
if redis.call('EXISTS', KEYS[2]) == 0 then return redis.error_reply('NOSESSION') end
redis.call('HSET', KEYS[1], unpack(ARGV))
local ttl = redis.call('PTTL', KEYS[2])
if ttl > 0 then redis.call('PEXPIRE', KEYS[1], ttl) end
return 1
