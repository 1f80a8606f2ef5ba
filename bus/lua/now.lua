-- The server's clock in ms, the clock of every `ts` in a stream. KEYS: any key of the slot
-- whose node is asked (in a cluster, each node has its own clock), read nowhere.
local t = redis.call('TIME')
return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
