-- Take a free partition lease with a new epoch. KEYS: lease epoch  ARGV: worker ttl_ms
if redis.call('EXISTS', KEYS[1]) == 1 then return false end
local token = redis.call('INCR', KEYS[2]) .. ':' .. ARGV[1]
redis.call('SET', KEYS[1], token, 'PX', ARGV[2])
return token
