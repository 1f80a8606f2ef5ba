-- One step of a group's handling of one session, fenced by the partition lease: acknowledge the
-- entries handled since the last step, settle a failed one (dead-letter then ack, or dead-letter
-- and pause), give back read entries that will not be handled now, then read what comes next.
-- KEYS: stream (<tag>:session:<sid>) lease (<tag>:lease:<group>). The session's other keys and
-- the partition's are named from these two; they share the hash tag, so the slot.
-- ARGV: token read count retention_ms nacks ack_id... ngive give_id...
--       [verdict entry deliveries error field value...]
--   read: '>' (up to count new entries), 'p' (the head of our pending list, COUNT 1: an entry
--   inherited from a previous owner or being retried; else as '>') or '' (settle only)
--   give: entries read but not handled (a drain, a pause): their delivery count goes back to 0,
--   so whoever reads them next counts a first delivery
--   verdict: 'skip' (dead-letter and ack) or 'pause' (dead-letter, keep pending, pause)
-- Returns {'entries', replayed, deliveries, {id, fields}...} (deliveries of the first entry;
-- the others are first deliveries) | {'idle'} | {'paused'} | {'gone'}
local k_stream, k_lease = KEYS[1], KEYS[2]
local tag, group = string.match(k_lease, '^(.*):lease:(.*)$')
local sid = string.sub(k_stream, #tag + #':session:' + 1)
local consumer = 'p' .. string.match(tag, '{(%d+)}$')
local k_paused = tag .. ':paused:' .. group
local token, read, count, retention = ARGV[1], ARGV[2], ARGV[3], ARGV[4]

if redis.call('GET', k_lease) ~= token then
  return redis.error_reply('FENCED lease of ' .. k_lease .. ' is not ' .. token)
end

local nacks = tonumber(ARGV[5])
if nacks > 0 then redis.call('XACK', k_stream, group, unpack(ARGV, 6, 5 + nacks)) end
local at = 6 + nacks
local ngive = tonumber(ARGV[at])
if ngive > 0 then
  local claim = {k_stream, group, consumer, 0, unpack(ARGV, at + 1, at + ngive)}
  for _, option in ipairs({'RETRYCOUNT', 0, 'JUSTID'}) do claim[#claim + 1] = option end
  redis.call('XCLAIM', unpack(claim))
end
at = at + ngive + 1
local verdict = ARGV[at]
if verdict then
  local entry = ARGV[at + 1]
  local dead = {'session', sid, 'group', group, 'entry', entry, 'deliveries', ARGV[at + 2],
                'error', ARGV[at + 3], 'policy', verdict}
  for i = at + 4, #ARGV do dead[#dead + 1] = ARGV[i] end
  redis.call('XADD', tag .. ':dead', '*', unpack(dead))
  if verdict == 'pause' then
    redis.call('HSET', k_paused, sid, entry)
    return {'paused'}
  end
  redis.call('XACK', k_stream, group, entry)
end
if read == '' then return {'idle'} end
if redis.call('HEXISTS', k_paused, sid) == 1 then return {'paused'} end

local function read_from(from, n)
  local r = redis.pcall('XREADGROUP', 'GROUP', group, consumer, 'COUNT', n, 'STREAMS', k_stream, from)
  if type(r) == 'table' and r.err then
    if not string.find(r.err, 'NOGROUP') then error(r.err) end
    if redis.call('EXISTS', k_stream) == 0 then return 'gone' end
    redis.call('XGROUP', 'CREATE', k_stream, group, '0')
    r = redis.call('XREADGROUP', 'GROUP', group, consumer, 'COUNT', n, 'STREAMS', k_stream, from)
  end
  if r and #r[1][2] > 0 then return r[1][2] end
  return nil
end

local entries
if read == 'p' then
  entries = read_from('0', 1)
  if entries == 'gone' then redis.call('SREM', tag .. ':live', sid) return {'gone'} end
  if entries then
    local id = entries[1][1]
    local p = redis.call('XPENDING', k_stream, group, id, id, 1, consumer)
    return {'entries', 1, p[1][4], entries[1]}
  end
end
entries = read_from('>', tonumber(count))
if entries == 'gone' then redis.call('SREM', tag .. ':live', sid) return {'gone'} end
if entries then return {'entries', 0, 1, unpack(entries)} end
retire_if_done(k_stream, tag, sid, retention)
return {'idle'}
