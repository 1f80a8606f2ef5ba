-- Shared by the scripts that can retire a session (publish, step, end). Prepended by
-- bus/scripts.py.
-- A session's keys are <tag>:session:<sid>[:meta|:inbox|:sent|:state] and its partition's are
-- <tag>:live, <tag>:ended...; <tag> is <prefix>:{P}, so all of them live in one slot.

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- The consumer groups of the stream, each as a table of its XINFO GROUPS fields.
local function groups_of(stream)
  local groups = {}
  for n, g in ipairs(redis.call('XINFO', 'GROUPS', stream)) do
    local info = {}
    for i = 1, #g, 2 do info[g[i]] = g[i + 1] end
    groups[n] = info
  end
  return groups
end

-- True when stream id a is at or after b.
local function at_or_after(a, b)
  local a_ms, a_seq = string.match(a, '^(%d+)-(%d+)$')
  local b_ms, b_seq = string.match(b, '^(%d+)-(%d+)$')
  a_ms, b_ms = tonumber(a_ms), tonumber(b_ms)
  return a_ms > b_ms or (a_ms == b_ms and tonumber(a_seq) >= tonumber(b_seq))
end

-- True when every consumer group of the stream has read and acknowledged all of it: nothing
-- pending, and its last delivered id at (or after) the stream's last entry. Not the group's
-- lag: Redis 7.0 does not carry a group's read counter in what it writes to its AOF or sends
-- its replicas, so after a restart from a rewritten AOF, or on a replica that synced while the
-- group existed, a group that read everything can show a lag for good (Valkey 9 carries it).
local function all_groups_done(stream)
  local last = redis.call('XREVRANGE', stream, '+', '-', 'COUNT', 1)
  local last_id = #last > 0 and last[1][1] or '0-0'
  for _, info in ipairs(groups_of(stream)) do
    if info['pending'] > 0 or not at_or_after(info['last-delivered-id'], last_id) then
      return false
    end
  end
  return true
end

-- An ended session whose every group is done: its keys expire after the retention time, and
-- it moves from the live set to the ended index. Nothing unacknowledged is ever expired.
local function retire_if_done(k_stream, tag, sid, retention)
  if redis.call('HEXISTS', k_stream .. ':meta', 'ended') == 0 or not all_groups_done(k_stream) then
    return false
  end
  for _, suffix in ipairs({'', ':meta', ':inbox', ':sent', ':state'}) do
    redis.call('PEXPIRE', k_stream .. suffix, retention)
  end
  local now = now_ms()
  redis.call('SREM', tag .. ':live', sid)
  redis.call('ZADD', tag .. ':ended', now + tonumber(retention), sid)
  redis.call('ZREMRANGEBYSCORE', tag .. ':ended', '-inf', '(' .. now)
  return true
end
