-- Take a free partition lease with a new epoch, and create its fence: an empty stream with the
-- group, expiring with the lease, that every read of the owner names (see step.lua). The
-- previous epoch's fence goes, so a stale owner's reads fail even if its lease was deleted.
-- KEYS: lease epoch  ARGV: worker ttl_ms
-- An epoch is at least the server's time in ms: after the server lost data (a restart without
-- persistence, the last second of an AOF, a failover to a lagging replica) its counter may be
-- gone or behind, and epochs go on from the clock instead of repeating one a stale owner may
-- still hold, whose fence would then be ours.
if redis.call('EXISTS', KEYS[1]) == 1 then return false end
local tag, group = string.match(KEYS[1], '^(.*):lease:(.*)$')
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local epoch = redis.call('INCR', KEYS[2])
local previous = epoch - 1  -- the epoch handed out before
if epoch <= now then
  epoch = now + 1
  redis.call('SET', KEYS[2], epoch)
end
local token = epoch .. ':' .. ARGV[1]
redis.call('SET', KEYS[1], token, 'PX', ARGV[2])
local fence = tag .. ':fence:' .. group .. ':'
redis.call('DEL', fence .. previous, fence .. epoch)
redis.call('XGROUP', 'CREATE', fence .. epoch, group, '$', 'MKSTREAM')
redis.call('PEXPIREAT', fence .. epoch, redis.call('PEXPIRETIME', KEYS[1]))
return token
