-- Open-ish load at a fixed mean rate: every connection waits a random think time
-- (exponential, mean given as the first script argument in milliseconds) before
-- each request, so requests from many connections interleave like independent
-- clients instead of arriving in lockstep. LuaJIT's generator starts from the
-- same seed in every run, so each proxy sees the same sequence of waits.
local mean_ms = 10

init = function(args)
  mean_ms = tonumber(args[1]) or mean_ms
end

delay = function()
  local u = math.random()
  if u < 1e-9 then u = 1e-9 end
  -- wrk truncates to whole milliseconds; +0.5 keeps the mean where it was asked.
  return -math.log(u) * mean_ms + 0.5
end

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("RESULT requests=%d duration_us=%d p50_us=%d p99_us=%d errors=%d\n",
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    e.connect + e.read + e.write + e.status + e.timeout))
end
