#!/usr/bin/env bash
# The README's replay demo with curl: a client that disconnects mid-answer and reconnects
# with its last id, live or after the answer's end, gets every word it missed and the rest,
# nothing twice; an id older than the log gets the gap header and event.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --quiet --example axum_server
work="$(mktemp -d)"
server=""
cleanup() { [ -n "${server}" ] && kill -KILL "${server}" 2>/dev/null || true; }
trap cleanup EXIT
fail() {
  echo "demo replay check failed: $*"
  echo "-- server output"; tail -n 20 "${work}/server" || true
  exit 1
}
"${CARGO_TARGET_DIR:-target}/debug/examples/axum_server" 127.0.0.1:0 >"${work}/server" 2>&1 &
server=$!
for _ in $(seq 300); do grep -q "listening on" "${work}/server" && break; sleep 0.1; done
url="$(sed -n 's/.*listening on \(http:[^ ]*\).*/\1/p' "${work}/server")"
[ -n "${url}" ] || fail "the demo did not start"

# A word every 20 ms; the client leaves after about 0.5 s, mid-answer.
timeout 0.5 curl -sN -H 'mcp-session-id: ci-chat' "${url}/answer?interval_ms=20" >"${work}/first" || true
last="$(sed -n 's/^id: //p' "${work}/first" | tail -n 1)"
[ -n "${last}" ] || fail "the first connection got no event"
sleep 1
curl -sN -D "${work}/headers" -H 'mcp-session-id: ci-chat' -H "Last-Event-ID: ${last}" \
  "${url}/answer" >"${work}/second"
grep -qi '^sse-replay: complete; events=[0-9]*; tail' "${work}/headers" \
  || fail "no complete replay: $(cat "${work}/headers")"
ids="$(cat "${work}/first" "${work}/second" | sed -n 's/^id: //p' | tr '\n' ' ')"
total="$(cat "${work}/first" "${work}/second" | grep -c '^id: ')"
expected="$(seq 1 "${total}" | tr '\n' ' ')"
[ "${ids}" = "${expected}" ] || fail "ids over both connections: ${ids}"
[ "${total}" -gt 100 ] || fail "only ${total} words"
echo "demo replay: left after ${last} words, came back 1 s later, got the other $((total - last)) once each"

# A person who takes a while: back only after the whole answer (160 words, 3.2 s) was produced
# without them; the log keeps 150 words, so everything after an early id is still there.
timeout 0.5 curl -sN -H 'mcp-session-id: ci-slow' "${url}/answer?interval_ms=20" >"${work}/slow1" || true
slow="$(sed -n 's/^id: //p' "${work}/slow1" | tail -n 1)"
[ -n "${slow}" ] || fail "the slow client's first connection got no event"
sleep 4
curl -sN -D "${work}/slow_headers" -H 'mcp-session-id: ci-slow' -H "Last-Event-ID: ${slow}" \
  "${url}/answer" >"${work}/slow2"
grep -qi "^sse-replay: complete; events=$((160 - slow))" "${work}/slow_headers" \
  || fail "no complete replay after the answer's end: $(cat "${work}/slow_headers")"
ids="$(cat "${work}/slow1" "${work}/slow2" | sed -n 's/^id: //p' | tr '\n' ' ')"
[ "${ids}" = "$(seq 1 160 | tr '\n' ' ')" ] || fail "the slow client's ids: ${ids}"
echo "demo replay: left after ${slow} words, came back 4 s later (the answer done), got the other $((160 - slow))"

curl -s -D "${work}/gap_headers" -H 'mcp-session-id: ci-chat' -H 'Last-Event-ID: 1' \
  "${url}/answer" >"${work}/gap"
grep -qi '^sse-replay: gap; reason=evicted' "${work}/gap_headers" \
  || fail "no gap header: $(cat "${work}/gap_headers")"
grep -q '^event: gap' "${work}/gap" || fail "no gap event"
echo "demo replay: an id older than the log got the gap header and event"
