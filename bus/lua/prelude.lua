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

-- True when every consumer group of the stream has read and acknowledged all of it. A group's
-- lag says whether it read everything, unless the server cannot tell (nil, after a deletion):
-- then its last delivered id is compared with the stream's last.
local function all_groups_done(stream)
  local last_id
  for _, info in ipairs(groups_of(stream)) do
    if info['pending'] > 0 or (info['lag'] and info['lag'] > 0) then return false end
    if not info['lag'] then
      if last_id == nil then
        local last = redis.call('XREVRANGE', stream, '+', '-', 'COUNT', 1)
        last_id = #last > 0 and last[1][1] or ''
      end
      if last_id ~= '' and info['last-delivered-id'] ~= last_id then return false end
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
