-- Give up our lease, and its fence, so the next owner can take it at once.
-- KEYS: lease fence  ARGV: token
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[2])
return redis.call('DEL', KEYS[1])
