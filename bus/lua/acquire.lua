-- Take a free partition lease with a new epoch, and create its fence: an empty stream with the
-- group, expiring with the lease, that every read of the owner names (see step.lua). The
-- previous epoch's fence goes, so a stale owner's reads fail even if its lease was deleted.
-- KEYS: lease epoch  ARGV: worker ttl_ms
-- The first epoch is the server's time in ms, not 1: after the server lost its data (a restart
-- without persistence) epochs go on from there instead of starting over, so none repeats one
-- a stale owner may still hold, whose fence would then be ours.
if redis.call('EXISTS', KEYS[1]) == 1 then return false end
local tag, group = string.match(KEYS[1], '^(.*):lease:(.*)$')
if redis.call('EXISTS', KEYS[2]) == 0 then
  local t = redis.call('TIME')
  redis.call('SET', KEYS[2], t[1] * 1000 + math.floor(t[2] / 1000))
end
local epoch = redis.call('INCR', KEYS[2])
local token = epoch .. ':' .. ARGV[1]
redis.call('SET', KEYS[1], token, 'PX', ARGV[2])
local fence = tag .. ':fence:' .. group .. ':'
redis.call('DEL', fence .. (epoch - 1), fence .. epoch)
redis.call('XGROUP', 'CREATE', fence .. epoch, group, '$', 'MKSTREAM')
redis.call('PEXPIREAT', fence .. epoch, redis.call('PEXPIRETIME', KEYS[1]))
return token
