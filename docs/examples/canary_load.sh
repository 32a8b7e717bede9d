#!/usr/bin/env bash
# Traffic for docs/canary.md: N chat requests to one route of `mlx-serving up` on this machine,
# PARALLEL at a time (default 8), request i from user "user-<i>" (the x-session-id header, so a
# sticky route keeps each user on one variant). Prints how many requests each variant answered with
# each status: "count status variant".
#
#   docs/examples/canary_load.sh ROUTE N [PARALLEL]        e.g.  docs/examples/canary_load.sh chat 400
#
# Bounded: at most 10000 requests, no request starts after MAX_SECONDS (default 600) and each one
# is cut off after 60 s. Loopback only: it sends to http://127.0.0.1:PORT (PORT defaults to 8100).
# Needs curl >= 7.84 (for %header{}); macOS 13 and later ship one.
set -euo pipefail

usage="usage: $0 ROUTE N [PARALLEL]"
route=${1:?$usage}
n=${2:?$usage}
parallel=${3:-8}
port=${PORT:-8100}
max_seconds=${MAX_SECONDS:-600}

for v in "$n" "$parallel" "$port" "$max_seconds"; do
  case $v in '' | *[!0-9]*) echo "$usage (N, PARALLEL, PORT and MAX_SECONDS are whole numbers)" >&2; exit 2 ;; esac
done
case $route in *[!A-Za-z0-9._:-]*) echo "route names here are letters, digits and . _ : -" >&2; exit 2 ;; esac
if [ "$n" -lt 1 ] || [ "$n" -gt 10000 ] || [ "$parallel" -lt 1 ] || [ "$parallel" -gt 64 ]; then
  echo "N must be 1..10000 and PARALLEL 1..64" >&2
  exit 2
fi

deadline=$(( $(date +%s) + max_seconds ))
export route port deadline
# Each request: "status variant" (status 000 when nothing answered), or "skipped time-limit".
seq "$n" | xargs -P "$parallel" -I{} sh -c '
  if [ "$(date +%s)" -ge "$deadline" ]; then echo "skipped time-limit"; exit 0; fi
  curl -s -o /dev/null --max-time 60 -w "%{http_code} %header{x-mlx-variant}\n" \
    "http://127.0.0.1:$port/v1/chat/completions" -H "Content-Type: application/json" -H "x-session-id: user-{}" \
    -d "{\"model\": \"$route\", \"messages\": [{\"role\": \"user\", \"content\": \"Hello\"}], \"max_tokens\": 8}" \
    || true' | sort | uniq -c
