-- Give up our lease so the next owner can take it at once. KEYS: lease  ARGV: token
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
return redis.call('DEL', KEYS[1])
