# Sourced by the GPU serving benchmarks: start `xlserve serve api_server` on 127.0.0.1:23333 with
# random weights at $model's shapes, wait until it is ready, and stop it again.
# start_server LOG [flags...]: sets $server (its pid); returns 1 if it exits before becoming ready. The server
# is ready once its first buckets are compiled and compiles the rest while it serves; a benchmark measures
# the steady state, so this also waits for the log to say every bucket is compiled, and for every bucket to
# have run once (NO_WARM_WAIT=1: not that).
start_server() {
  local log=$1
  shift
  python -m serving.cli serve api_server "$model" --load-format dummy --server-name 127.0.0.1 --server-port 23333 \
    --max-queue-len 100000 "$@" > "$log" 2>&1 &
  server=$!
  for _ in $(seq 900); do
    curl -sf http://127.0.0.1:23333/v1/ready > /dev/null && break
    kill -0 $server 2> /dev/null || { tail -30 "$log"; return 1; }
    sleep 1
  done
  grep -i "ready after" "$log"
  for _ in $(seq 900); do
    grep -qE "buckets compiled in|compiled bucket ([0-9]+)/\1 " "$log" && break
    kill -0 $server 2> /dev/null || { tail -30 "$log"; return 1; }
    sleep 1
  done
  grep -E "compiled bucket ([0-9]+)/\1 " "$log"
  # Then until every bucket has run once (the engine does so while idle; a server without the gauge passes).
  [ -n "${NO_WARM_WAIT:-}" ] && return 0
  for _ in $(seq 120); do
    unrun=$(curl -sf http://127.0.0.1:23333/metrics | awk '/^xlserve:startup_buckets_unrun/ {print $2}')
    case "$unrun" in 0|0.0|"") break ;; esac
    sleep 0.5
  done
}

# stop_server: print the compile and prefix-cache counters and the server's CPU time, then stop it.
stop_server() {
  curl -s http://127.0.0.1:23333/metrics \
    | grep -E "^xlserve:compil|^xlserve:mixed|^vllm:num_preemptions|^vllm:prefix_cache_(queries|hits)_total|^xlserve:prompt_tokens|^xlserve:shared_prefix" || true
  echo "server CPU time (engine thread and event loop together): $(ps -o cputime= -p $server)"
  kill -INT $server
  wait $server
}
