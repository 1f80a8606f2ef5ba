-- End a session without an event, for one whose bot went away without ending it: mark it
-- ended, so that it takes no new event, and retire it now if every group is done with it
-- (else the step that finds them done retires it, as after a final publish).
-- KEYS: stream (<tag>:session:<sid>)  ARGV: tag sid retention_ms reason request
-- Returns 'retired', 'ending' (a group has yet to handle some of it), 'ended' (it had ended
-- before) or 'unknown' (no such session; dropped from the live set if it was there). The same
-- request sent again (its reply was lost) gets 'retired' or 'ending' again, not 'ended'.
local k_stream = KEYS[1]
local k_meta = k_stream .. ':meta'
local tag, sid, retention, reason, request = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
if redis.call('EXISTS', k_meta) == 0 then
  redis.call('SREM', tag .. ':live', sid)
  return 'unknown'
end
if redis.call('HEXISTS', k_meta, 'ended') == 1 then
  if redis.call('HGET', k_meta, 'end_request') ~= request then return 'ended' end
  if redis.call('SISMEMBER', tag .. ':live', sid) == 0 then return 'retired' end
else
  redis.call('HSET', k_meta, 'ended', now_ms(), 'end_reason', reason, 'end_request', request)
end
if retire_if_done(k_stream, tag, sid, retention) then return 'retired' end
return 'ending'
