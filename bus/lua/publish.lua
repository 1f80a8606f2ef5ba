-- Append one event to a session: next seq, XADD, wake-up hint, all atomically in one slot.
-- KEYS: stream (<tag>:session:<sid>)  ARGV: tag sid type data final retention_ms publish_id
--   after dead_letter ngroups group... field value...
-- A retry of the session's last publish (same publish_id) returns its seq and id again instead of
-- appending twice, so a publisher may retry after a lost reply. A replay's (below) is remembered
-- apart (replay_*), so that one coming between the bot's publish and its retry does not make
-- the bot's event appended twice. `after` is the last seq this publisher appended to the
-- session (0 if none): a session the server does not know although its publisher does was lost
-- with the server's data, and its counter goes on from there.
-- `dead_letter` ('' if none) is the id in <tag>:dead of the dead letter this event replays: it
-- is removed as the event is appended, and if it is gone already (replayed or dropped), nothing
-- is appended (error NODEADLETTER), so a replay cut short and run again is not appended twice.
-- Returns {seq, id, restored} (restored: 1 if the counter was taken from `after`).
local k_stream = KEYS[1]
local k_meta = k_stream .. ':meta'
local tag, sid, final, retention, publish_id = ARGV[1], ARGV[2], ARGV[5], ARGV[6], ARGV[7]

-- True when some group of the stream may be idle on it, or a known service has none (which
-- it then gets, from the session's start: registered since the session began, it would
-- otherwise find the session retired under it). A group is idle when it has
-- read every entry published before the new one. That is a lag of 1 (or one the server cannot
-- tell), or, when entries appended without this script (a raw XADD, which no hint announced)
-- lie between, a last delivered id at or after the previous publish's entry `previous`.
local function may_be_idle(stream, known, previous)
  local groups = groups_of(stream)
  if #groups < known then
    local have = {}
    for _, info in ipairs(groups) do have[info['name']] = true end
    for i = 11, 10 + known do
      if not have[ARGV[i]] then redis.pcall('XGROUP', 'CREATE', stream, ARGV[i], '0') end
    end
    return true
  end
  for _, info in ipairs(groups) do
    if not info['lag'] or info['lag'] <= 1 then return true end
    if previous and at_or_after(info['last-delivered-id'], previous) then return true end
  end
  return #groups == 0
end

local dead_letter = ARGV[9]
local by = dead_letter == '' and 'publish' or 'replay'
local last = redis.call('HMGET', k_meta, by .. '_id', by .. '_reply', 'seq', 'publish_entry')
if last[1] == publish_id and last[2] then
  local seq, id = string.match(last[2], '^(%d+) (.+)$')
  return {tonumber(seq), id, 0}
end
if redis.call('HEXISTS', k_meta, 'ended') == 1 then
  return redis.error_reply('ENDED session ' .. sid .. ' has ended')
end
if dead_letter ~= '' and redis.call('XDEL', tag .. ':dead', dead_letter) == 0 then
  return redis.error_reply('NODEADLETTER dead letter ' .. dead_letter .. ' is gone')
end
local new, after = not last[3], tonumber(ARGV[8])
local restored = new and after > 0
if restored then redis.call('HSET', k_meta, 'seq', after) end
local seq = redis.call('HINCRBY', k_meta, 'seq', 1)
local ts = now_ms()
local fields = {'type', ARGV[3], 'seq', seq, 'ts', ts, 'data', ARGV[4]}
local ngroups = tonumber(ARGV[10])
for i = 11 + ngroups, #ARGV do fields[#fields + 1] = ARGV[i] end
local id = redis.call('XADD', k_stream, '*', unpack(fields))
redis.call('HSET', k_meta, by .. '_id', publish_id, by .. '_reply', seq .. ' ' .. id,
  'publish_entry', id)

if new then
  redis.call('HSET', k_meta, 'started', ts)
  redis.call('SADD', tag .. ':live', sid)
  -- Groups of the known services exist from the first event on, so the session cannot retire
  -- before each of them has handled it, even if a service is down right now.
  for i = 11, 10 + ngroups do redis.pcall('XGROUP', 'CREATE', k_stream, ARGV[i], '0') end
end
-- The hint that wakes the partition's owners; one lost on a dropped connection is made up for
-- by the rescan that follows every (re)subscription. Only a group that had read every entry
-- published before this one can be idle on the session (its handling ends after a read that
-- was not full, unless a hint came since): one with a published entry still to read was woken
-- for it and reads on by itself, so it needs no hint.
if new or may_be_idle(k_stream, ngroups, last[4]) then
  redis.call('SPUBLISH', tag .. ':wake', sid)
end

if final == '1' then
  redis.call('HSET', k_meta, 'ended', ts)
  retire_if_done(k_stream, tag, sid, retention)
end
return {seq, id, restored and 1 or 0}
