-- wrk script: POST /v1/pay with a fresh TransactionID per request, counting answers by status.
-- Arguments (after `--`): a run-unique prefix (Lua's unseeded math.random repeats across runs,
-- so uniqueness comes from the caller), the provider, and "replay" to send one key again and again.
local threads = {}
local counter = 0

function setup(thread)
  thread:set("id", #threads + 1)
  table.insert(threads, thread)
end

function init(args)
  prefix = args[1] or tostring(os.time())
  provider = args[2] or "FAST"
  replay = args[3] == "replay"
  statuses = {}
  wrk.method = "POST"
  wrk.headers["Content-Type"] = "application/json"
end

function request()
  local transaction_id
  if replay then
    transaction_id = prefix .. "-replay"
  else
    counter = counter + 1
    transaction_id = prefix .. "-" .. id .. "-" .. counter
  end
  local body = '{"TransactionID":"' .. transaction_id ..
    '","Amount":20.00,"Currency":"ZAR","ProviderKey":"' .. provider .. '"}'
  return wrk.format(nil, nil, nil, body)
end

function response(status, headers, body)
  statuses[status] = (statuses[status] or 0) + 1
end

function done(summary, latency, requests)
  local totals = {}
  for _, thread in ipairs(threads) do
    local counts = thread:get("statuses")
    for status, n in pairs(counts) do
      totals[status] = (totals[status] or 0) + n
    end
  end
  local parts = {}
  for status, n in pairs(totals) do
    table.insert(parts, '"' .. status .. '":' .. n)
  end
  io.write(string.format(
    'RESULT {"requests":%d,"duration_us":%d,"p50_us":%d,"p99_us":%d,"errors":%d,"statuses":{%s}}\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout,
    table.concat(parts, ",")))
end
