-- Resume a session paused on a dead letter: retry its entry with a fresh delivery count, or
-- drop it (ack) and go on; then wake the owner. KEYS: paused stream meta dead
-- ARGV: sid group consumer drop wake_channel request dead_letter.  Returns the entry id, or nil
-- if not paused. `dead_letter` ('' if none) is the id in `dead` of the dead letter the session
-- paused on; without it, the one the step script noted in the meta's ``paused_letter:<group>``,
-- or, noted nowhere, the letters of pauses on this entry found near it in `dead`. It is
-- removed with the resume, so that it is neither listed nor replayed afterwards.
-- The meta's ``resume:<group>`` keeps the last request and its entry: the same request sent
-- again (its reply was lost) gets that entry again and resumes nothing more, even if the
-- session paused on the entry again since.
local field = 'resume:' .. ARGV[2]
local last = redis.call('HGET', KEYS[3], field)
if last then
  local request, resumed = string.match(last, '^(%S+) (%S+)$')
  if request == ARGV[6] then return resumed end
end
local entry = redis.call('HGET', KEYS[1], ARGV[1])
if not entry then return false end
redis.call('HDEL', KEYS[1], ARGV[1])
if ARGV[4] == '1' then
  redis.call('XACK', KEYS[2], ARGV[2], entry)
else
  redis.call('XCLAIM', KEYS[2], ARGV[2], ARGV[3], 0, entry, 'RETRYCOUNT', 0)
end
local letter = ARGV[7]
if letter == '' then letter = redis.call('HGET', KEYS[3], 'paused_letter:' .. ARGV[2]) end
if letter then
  redis.call('XDEL', KEYS[4], letter)  -- after: a failure keeps it
else
  -- A pause noted nowhere (made before the step noted its letter, or of a session without a
  -- meta): its letter is among those written since its entry's millisecond (ids are per
  -- stream: a letter of that ms may have a lower sequence number), the first 100 of them at
  -- most looked at (step.lua writes session, group, entry, deliveries, error, policy first).
  -- Every pause letter of this entry is settled now, an earlier pause's too.
  local since = string.match(entry, '^(%d+)') .. '-0'
  for _, dead in ipairs(redis.call('XRANGE', KEYS[4], since, '+', 'COUNT', 100)) do
    local f = dead[2]
    if f[2] == ARGV[1] and f[4] == ARGV[2] and f[6] == entry and f[12] == 'pause' then
      redis.call('XDEL', KEYS[4], dead[1])
    end
  end
end
redis.call('HDEL', KEYS[3], 'paused_letter:' .. ARGV[2])
if redis.call('EXISTS', KEYS[3]) == 1 then  -- never a meta for a session that has none
  redis.call('HSET', KEYS[3], field, ARGV[6] .. ' ' .. entry)
end
redis.call('SPUBLISH', ARGV[5], ARGV[1])
return entry
