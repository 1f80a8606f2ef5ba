-- Write a command or reply to a session's bot inbox, at most once per dedupe key.
-- KEYS: inbox meta sent [lease]  ARGV: type data dedupe call token field value...
-- `call` names one `Bus.send` (the same in its retries): a retry whose first try was written
-- gets that write's {seq, id} back; another call with the same dedupe key gets false.
-- With a `lease` (a handler's send), nothing is written unless it holds `token`: a stale
-- owner's command is refused, as its state writes are.
if redis.call('EXISTS', KEYS[2]) == 0 then return redis.error_reply('NOSESSION') end
local written = redis.call('HGET', KEYS[3], ARGV[3])
if written then
  local call, seq, id = string.match(written, '^(%S+) (%d+) (%S+)$')
  if call == ARGV[4] then return {tonumber(seq), id} end
  return false
end
if KEYS[4] and redis.call('GET', KEYS[4]) ~= ARGV[5] then
  return redis.error_reply('FENCED lease of ' .. KEYS[4] .. ' is not ' .. ARGV[5])
end
local seq = redis.call('HINCRBY', KEYS[2], 'inbox_seq', 1)
local t = redis.call('TIME')
local ts = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local fields = {'type', ARGV[1], 'seq', seq, 'ts', ts, 'data', ARGV[2]}
for i = 6, #ARGV do fields[#fields + 1] = ARGV[i] end
local id = redis.call('XADD', KEYS[1], '*', unpack(fields))
redis.call('HSET', KEYS[3], ARGV[3], ARGV[4] .. ' ' .. seq .. ' ' .. id)
-- A retired session keeps its expiry on every key, the dedupe hash included.
local ttl = redis.call('PTTL', KEYS[2])
if ttl > 0 then
  redis.call('PEXPIRE', KEYS[1], ttl)
  redis.call('PEXPIRE', KEYS[3], ttl)
end
return {seq, id}
