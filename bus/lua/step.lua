-- Steps of a group's handling of sessions of one partition, fenced by the partition lease. Each
-- session's step acknowledges the entries handled since its last one, settles a failed one
-- (dead-letter then ack, or dead-letter and pause), gives back read entries that will not be
-- handled now, then says whether the session may read on. The read of new entries itself is
-- not in here: the caller sends it right after this call (unless it expects nothing new: a
-- '>' step after a batch that was not full, with no hint since), as a plain XREADGROUP naming the
-- lease's fence stream too, which exists only as long as the lease (see acquire.lua), so a
-- stale owner's read fails. (Entries coming back out of Lua cost twice the read itself.)
-- KEYS: lease (<tag>:lease:<group>) then one stream (<tag>:session:<sid>) per step. The other
-- keys are named from these; they share the hash tag, so the slot.
-- ARGV: token retention_ms group, then per step either
--       'a' ack_id  (acknowledge one entry, nothing else: the common step, kept short), or
--       read nacks ack_id... ngive give_id... nverdict [verdict entry deliveries error field...]
--   read: 'p' (a run's first read, or after anything irregular: is the session paused, gone,
--   or is there a head of our pending list, COUNT 1, an entry inherited from a previous owner
--   or being retried; else new entries may be read), '>' (the run read before, so the session
--   is neither paused nor gone: retire it if it is done, else new entries may be read), '+'
--   (as '>', but the run's last read came back full, so more are likely waiting: read on,
--   no check) or '' (settle only). Only '>' retires: a session usually has new entries at a
--   'p' or '+' step, and finding that out would cost it an XINFO; the caller sends a '>' step
--   after a 'p' or '+' step whose read found nothing.
--   give: entries read but not handled (a drain, a pause): their delivery count goes back to 0,
--   so whoever reads them next counts a first delivery
--   verdict: 'skip' (dead-letter and ack) or 'pause' (dead-letter, keep pending, pause)
-- Returns one reply per step: {'read'} (read the new entries now) | {'head', deliveries,
-- pending, {id, fields}, resumed} (our pending head, how many entries we have pending, and 1 if
-- the head is the entry `Bus.resume` retried last, else 0) | {'idle'} |
-- {'paused'} | {'gone'} | 0 (an 'a' step done) | {'error', message} (that step failed; the
-- others stand); or, when every step was an 'a' step done, 0 alone (a list of zeros costs the
-- server a tenth more per call).
local k_lease = KEYS[1]
local token, retention, group = ARGV[1], ARGV[2], ARGV[3]

if redis.call('GET', k_lease) ~= token then
  return redis.error_reply('FENCED lease of ' .. k_lease .. ' is not ' .. token)
end

-- Names only the longer steps need, made at the first of them.
local tag, consumer, k_paused
local function names()
  tag = string.sub(k_lease, 1, #k_lease - #':lease:' - #group)
  consumer = 'p' .. string.match(tag, '{(%d+)}$')
  k_paused = tag .. ':paused:' .. group
end

-- How many entries our consumer has pending on the stream ('gone' if there is no stream; the
-- group is made if the stream has none yet).
local function own_pending(k_stream, sid)
  local r = redis.pcall('XPENDING', k_stream, group)
  if type(r) == 'table' and r.err then
    if not string.find(r.err, 'NOGROUP') then error(r.err) end
    if redis.call('EXISTS', k_stream) == 0 then return 'gone' end
    -- A session that retired before this group came to it: its keys expire, so a group made
    -- now would have entries to handle on a stream that may vanish under them.
    if redis.call('SISMEMBER', tag .. ':live', sid) == 0 then return 'gone' end
    redis.call('XGROUP', 'CREATE', k_stream, group, '0')
    return 0
  end
  for _, c in ipairs(r[4] or {}) do
    if c[1] == consumer then return tonumber(c[2]) end
  end
  return 0
end

-- One session's step, its arguments starting at ARGV[at]; returns its reply.
local function step(k_stream, at)
  if not tag then names() end
  local sid = string.sub(k_stream, #tag + #':session:' + 1)
  local read = ARGV[at]
  local nacks = tonumber(ARGV[at + 1])
  if nacks > 0 then redis.call('XACK', k_stream, group, unpack(ARGV, at + 2, at + 1 + nacks)) end
  at = at + 2 + nacks
  local ngive = tonumber(ARGV[at])
  if ngive > 0 then
    local claim = {k_stream, group, consumer, 0, unpack(ARGV, at + 1, at + ngive)}
    for _, option in ipairs({'RETRYCOUNT', 0, 'JUSTID'}) do claim[#claim + 1] = option end
    redis.call('XCLAIM', unpack(claim))
  end
  at = at + ngive + 1
  local nverdict = tonumber(ARGV[at])
  if nverdict > 0 then
    local verdict, entry = ARGV[at + 1], ARGV[at + 2]
    -- A step sent again after its reply was lost finds the entry settled: no second letter.
    local unsettled = #redis.call('XPENDING', k_stream, group, entry, entry, 1) == 1
    if unsettled and redis.call('HGET', k_paused, sid) ~= entry then
      local dead = {'session', sid, 'group', group, 'entry', entry, 'deliveries', ARGV[at + 3],
                    'error', ARGV[at + 4], 'policy', verdict}
      for i = at + 5, at + nverdict do dead[#dead + 1] = ARGV[i] end
      local letter = redis.call('XADD', tag .. ':dead', '*', unpack(dead))
      -- The letter a pause is on, for `resume.lua` to remove (never a meta for a session
      -- that has none: it would not expire).
      if verdict == 'pause' and redis.call('EXISTS', k_stream .. ':meta') == 1 then
        redis.call('HSET', k_stream .. ':meta', 'paused_letter:' .. group, letter)
      end
    end
    if verdict == 'pause' then
      redis.call('HSET', k_paused, sid, entry)
      return {'paused'}
    end
    redis.call('XACK', k_stream, group, entry)
  end
  if read == '' then return {'idle'} end
  if read == 'p' then
    if redis.call('HEXISTS', k_paused, sid) == 1 then return {'paused'} end
    local pending = own_pending(k_stream, sid)
    if pending == 'gone' then redis.call('SREM', tag .. ':live', sid) return {'gone'} end
    if pending > 0 then
      local r = redis.call('XREADGROUP', 'GROUP', group, consumer, 'COUNT', 1,
                           'STREAMS', k_stream, 0)
      local head = r[1][2][1]
      local p = redis.call('XPENDING', k_stream, group, head[1], head[1], 1, consumer)
      -- Is it the entry a resume retried last (resume.lua: '<request> <entry>')? Its count
      -- started over then, though it was handled before.
      local last = redis.call('HGET', k_stream .. ':meta', 'resume:' .. group)
      local resumed = last and string.match(last, ' (%S+)$') == head[1] and 1 or 0
      return {'head', p[1][4], pending, head, resumed}
    end
    return {'read'}
  end
  if read == '>' and retire_if_done(k_stream, tag, sid, retention) then return {'idle'} end
  return {'read'}
end

-- Where the arguments of the step starting at ARGV[at] end.
local function after(at)
  at = at + 2 + tonumber(ARGV[at + 1])
  at = at + 1 + tonumber(ARGV[at])
  return at + 1 + tonumber(ARGV[at])
end

-- The replies of the steps that were not plain acks done; if there are none, 0 stands for all.
local replies, at = {}, 4
for i = 2, #KEYS do
  local ok, reply
  if ARGV[at] == 'a' then
    ok, reply = true, redis.pcall('XACK', KEYS[i], group, ARGV[at + 1])
    if type(reply) == 'table' then ok = false else reply = nil end
    at = at + 2
  else
    ok, reply = pcall(step, KEYS[i], at)
    at = after(at)
  end
  if not ok then  -- that session's step failed; the others stand
    reply = {'error', tostring(type(reply) == 'table' and reply.err or reply)}
  end
  replies[i - 1] = reply
end
if next(replies) == nil then return 0 end
for i = 1, #KEYS - 1 do replies[i] = replies[i] or 0 end
return replies
