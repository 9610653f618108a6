#!/usr/bin/env bash
# The demo drains its open streams and exits within a second of Ctrl-C (SIGINT) with a client
# connected (issue #13): the client gets its last event whole, then the `retry:` the demo sets.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --quiet --example axum_server
work="$(mktemp -d)"
server=""
client=""
cleanup() {
  for pid in ${server} ${client}; do kill -KILL "${pid}" 2>/dev/null || true; done
}
trap cleanup EXIT
fail() {
  echo "demo exit check failed: $*"
  echo "-- server output"; tail -n 20 "${work}/server" || true
  echo "-- client output"; tail -n 20 "${work}/client" || true
  exit 1
}
"${CARGO_TARGET_DIR:-target}/debug/examples/axum_server" 127.0.0.1:0 >"${work}/server" 2>&1 &
server=$!
for _ in $(seq 300); do grep -q "listening on" "${work}/server" && break; sleep 0.1; done
url="$(sed -n 's/.*listening on \(http:[^ ]*\).*/\1/p' "${work}/server")"
[ -n "${url}" ] || fail "the demo did not start"
touch "${work}/client"
curl -sN -H 'mcp-session-id: ci-drain' "${url}/events" >"${work}/client" &
client=$!
for _ in $(seq 300); do grep -q '^id:' "${work}/client" && break; sleep 0.1; done
grep -q '^id:' "${work}/client" || fail "the client got no event"

start="$(date +%s%N)"
kill -INT "${server}"
# At most 10 s: a demo that never exits fails the check instead of hanging CI.
for _ in $(seq 1000); do kill -0 "${server}" 2>/dev/null || break; sleep 0.01; done
end="$(date +%s%N)"
kill -0 "${server}" 2>/dev/null && fail "the demo was still running 10 s after SIGINT"
status=0
wait "${server}" || status=$?
server=""
for _ in $(seq 500); do kill -0 "${client}" 2>/dev/null || break; sleep 0.01; done
ms=$(( (end - start) / 1000000 ))
events="$(grep -c '^id:' "${work}/client" || true)"
echo "demo exited (status ${status}) ${ms} ms after SIGINT; its client got ${events} events, ending:"
tail -n 4 "${work}/client"
[ "${status}" -eq 0 ] || fail "exit status ${status}"
[ "${ms}" -lt 1000 ] || fail "${ms} ms to exit"
# The last event is whole (a blank line ends it) and `retry: 1000` comes after it.
tail -n 3 "${work}/client" | tr -d '\r' | paste -sd '|' | grep -qx '|retry: 1000|' \
  || fail "the stream did not end with a whole event and retry: 1000"
echo "ok"
