-- wrk script for the benchmark: POST a realistic chat completion, report one JSON line.
--
--   BENCH_BODY_FILE=body.json wrk -t1 -c32 -d10s -s bench/wrk_chat.lua http://127.0.0.1:PORT
--
-- BENCH_BODY_FILE: the request body (bench/run.py writes bench.payloads.chat_body() there);
-- without it, a small built-in body. BENCH_PATH: the request path (default
-- /v1/chat/completions). At the end one line "BENCH_JSON {...}" with requests, duration,
-- errors and latency percentiles in microseconds, for bench/run.py to read.

local path = os.getenv("BENCH_PATH") or "/v1/chat/completions"
local body = '{"model": "gpt-4o-mini-2024-07-18", "messages": [{"role": "user", "content": "hi"}]}'
local body_file = os.getenv("BENCH_BODY_FILE")
if body_file then
   local handle = assert(io.open(body_file, "rb"))
   body = handle:read("*a")
   handle:close()
end

wrk.method = "POST"
wrk.path = path
wrk.body = body
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Accept"] = "application/json"
wrk.headers["Authorization"] = "Bearer sk-bench-not-a-key"
wrk.headers["User-Agent"] = "OpenAI/Python 1.99.0"

function done(summary, latency, requests)
   local errors = summary.errors
   io.write(string.format(
      'BENCH_JSON {"requests": %d, "duration_us": %d, "bytes": %d, '
         .. '"errors": {"connect": %d, "read": %d, "write": %d, "status": %d, "timeout": %d}, '
         .. '"latency_us": {"p50": %d, "p90": %d, "p99": %d, "max": %d, "mean": %.1f}}\n',
      summary.requests, summary.duration, summary.bytes,
      errors.connect, errors.read, errors.write, errors.status, errors.timeout,
      latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max, latency.mean))
end
