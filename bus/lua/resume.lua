-- Resume a session paused on a dead letter: retry its entry with a fresh delivery count, or
-- drop it (ack) and go on; then wake the owner. KEYS: paused stream
-- ARGV: sid group consumer drop wake_channel.  Returns the entry id, or nil if not paused.
local entry = redis.call('HGET', KEYS[1], ARGV[1])
if not entry then return false end
redis.call('HDEL', KEYS[1], ARGV[1])
if ARGV[4] == '1' then
  redis.call('XACK', KEYS[2], ARGV[2], entry)
else
  redis.call('XCLAIM', KEYS[2], ARGV[2], ARGV[3], 0, entry, 'RETRYCOUNT', 0)
end
redis.call('SPUBLISH', ARGV[5], ARGV[1])
return entry
