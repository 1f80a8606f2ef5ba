-- One step of a group's handling of one session, fenced by the partition lease:
-- settle the previous entry (ack, or dead-letter then ack, or dead-letter and pause), then read
-- the next one: the head of our pending list if there is one (an entry inherited from a previous
-- owner, or one being retried), else the next new entry.
-- KEYS: stream (<tag>:session:<sid>) lease (<tag>:lease:<group>). The session's other keys and
-- the partition's are named from these two; they share the hash tag, so the slot.
-- ARGV: token ack_id read retention_ms [verdict deliveries error field value...]
--   read: '1' (read the next entry), 'p' (the same, checking the pending list even after an
--   ack: a retry after a lost reply) or '' (settle only)
--   verdict: 'skip' (dead-letter and ack) or 'pause' (dead-letter, keep pending, pause)
-- Returns {'entry', id, fields, deliveries, replayed} | {'idle'} | {'paused'} | {'gone'}
local k_stream, k_lease = KEYS[1], KEYS[2]
local tag, group = string.match(k_lease, '^(.*):lease:(.*)$')
local sid = string.sub(k_stream, #tag + #':session:' + 1)
local consumer = 'p' .. string.match(tag, '{(%d+)}$')
local k_paused = tag .. ':paused:' .. group
local token, ack_id, read, retention, verdict = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]

if redis.call('GET', k_lease) ~= token then
  return redis.error_reply('FENCED lease of ' .. k_lease .. ' is not ' .. token)
end

if ack_id ~= '' then
  if verdict then
    local dead = {'session', sid, 'group', group, 'entry', ack_id, 'deliveries', ARGV[6],
                  'error', ARGV[7], 'policy', verdict}
    for i = 8, #ARGV do dead[#dead + 1] = ARGV[i] end
    redis.call('XADD', tag .. ':dead', '*', unpack(dead))
  end
  if verdict == 'pause' then
    redis.call('HSET', k_paused, sid, ack_id)
    return {'paused'}
  end
  redis.call('XACK', k_stream, group, ack_id)
end
if read == '' then return {'idle'} end
if redis.call('HEXISTS', k_paused, sid) == 1 then return {'paused'} end

local function read_one(from)
  local r = redis.pcall('XREADGROUP', 'GROUP', group, consumer, 'COUNT', 1, 'STREAMS', k_stream, from)
  if type(r) == 'table' and r.err then
    if not string.find(r.err, 'NOGROUP') then error(r.err) end
    if redis.call('EXISTS', k_stream) == 0 then return 'gone' end
    redis.call('XGROUP', 'CREATE', k_stream, group, '0')
    r = redis.call('XREADGROUP', 'GROUP', group, consumer, 'COUNT', 1, 'STREAMS', k_stream, from)
  end
  if r and #r[1][2] > 0 then return r[1][2][1] end
  return nil
end

-- After an ack the pending list of this session is empty (one entry at a time), so the
-- pending read is needed only when nothing was just acknowledged.
local entry = nil
if ack_id == '' or verdict or read == 'p' then
  entry = read_one('0')
  if entry == 'gone' then redis.call('SREM', tag .. ':live', sid) return {'gone'} end
  if entry then
    local p = redis.call('XPENDING', k_stream, group, entry[1], entry[1], 1, consumer)
    return {'entry', entry[1], entry[2], p[1][4], 1}
  end
end
entry = read_one('>')
if entry == 'gone' then redis.call('SREM', tag .. ':live', sid) return {'gone'} end
if entry then return {'entry', entry[1], entry[2], 1, 0} end
retire_if_done(k_stream, tag, sid, retention)
return {'idle'}
