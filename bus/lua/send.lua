-- Write a command or reply to a session's bot inbox, at most once per dedupe key.
-- KEYS: inbox meta sent  ARGV: type data dedupe field value...
if redis.call('EXISTS', KEYS[2]) == 0 then return redis.error_reply('NOSESSION') end
if ARGV[3] ~= '' and redis.call('SADD', KEYS[3], ARGV[3]) == 0 then return false end
local seq = redis.call('HINCRBY', KEYS[2], 'inbox_seq', 1)
local t = redis.call('TIME')
local ts = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local fields = {'type', ARGV[1], 'seq', seq, 'ts', ts, 'data', ARGV[2]}
for i = 4, #ARGV do fields[#fields + 1] = ARGV[i] end
local id = redis.call('XADD', KEYS[1], '*', unpack(fields))
-- A retired session keeps its expiry on every key, the dedupe set included.
local ttl = redis.call('PTTL', KEYS[2])
if ttl > 0 then
  redis.call('PEXPIRE', KEYS[1], ttl)
  redis.call('PEXPIRE', KEYS[3], ttl)
end
return {seq, id}
