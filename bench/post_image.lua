-- wrk script: POST an image to /v1/inspect and print a JSON summary.
-- IMG: one file sent every time. IMG_LIST (optional): a file naming one image
-- per line, sent in turn, so every request carries a different picture.
wrk.method = "POST"
wrk.headers["Content-Type"] = "image/jpeg"

local function read(path)
  local f = assert(io.open(path, "rb"))
  local data = f:read("*all")
  f:close()
  return data
end

local bodies = {}
local list = os.getenv("IMG_LIST")
if list and list ~= "" then
  for path in io.lines(list) do
    if path ~= "" then bodies[#bodies + 1] = read(path) end
  end
else
  bodies[1] = read(os.getenv("IMG"))
end
wrk.body = bodies[1]

local n = 0
function request()
  n = n + 1
  return wrk.format(nil, nil, nil, bodies[(n % #bodies) + 1])
end

function done(summary, latency, requests)
  local secs = summary.duration / 1e6
  io.write(string.format(
    'WRK_JSON {"requests":%d,"images_per_second":%.2f,"p50_ms":%.2f,"p90_ms":%.2f,"p99_ms":%.2f,"non_2xx":%d,"socket_errors":%d}\n',
    summary.requests, summary.requests / secs,
    latency:percentile(50) / 1000, latency:percentile(90) / 1000, latency:percentile(99) / 1000,
    summary.errors.status, summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout))
end
