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
# To stderr: a check inside `$(…)` fails too.
fail() {
  {
    echo "demo replay check failed: $*"
    echo "-- server output"; tail -n 20 "${work}/server" || true
  } >&2
  exit 1
}
"${CARGO_TARGET_DIR:-target}/debug/examples/axum_server" 127.0.0.1:0 >"${work}/server" 2>&1 &
server=$!
for _ in $(seq 300); do grep -q "listening on" "${work}/server" && break; sleep 0.1; done
url="$(sed -n 's/.*listening on \(http:[^ ]*\).*/\1/p' "${work}/server")"
[ -n "${url}" ] || fail "the demo did not start"

# Session $1 asks for the answer, a word every 20 ms, leaves after about 0.5 s, mid-answer, and
# comes back $2 s later with its last id: prints that id; the two connections' bodies go to
# $1.1 and $1.2, the second's headers to $1.headers.
leave_and_return() {
  timeout 0.5 curl -sN -H "mcp-session-id: $1" "${url}/answer?interval_ms=20" >"${work}/$1.1" || true
  local last
  last="$(sed -n 's/^id: //p' "${work}/$1.1" | tail -n 1)"
  [ -n "${last}" ] || fail "$1: the first connection got no event"
  sleep "$2"
  curl -sN -D "${work}/$1.headers" -H "mcp-session-id: $1" -H "Last-Event-ID: ${last}" \
    "${url}/answer" >"${work}/$1.2"
  ids="$(cat "${work}/$1.1" "${work}/$1.2" | sed -n 's/^id: //p' | tr '\n' ' ')"
  [ "${ids}" = "$(seq 1 160 | tr '\n' ' ')" ] || fail "$1: the ids over both connections: ${ids}"
  echo "${last}"
}

# Back 1 s later, mid-answer: the words missed, then the rest live.
last="$(leave_and_return ci-chat 1)"
grep -qi '^sse-replay: complete; events=[0-9]*; tail' "${work}/ci-chat.headers" \
  || fail "no complete replay: $(cat "${work}/ci-chat.headers")"
echo "demo replay: left after ${last} words, came back 1 s later, got the other $((160 - last)) once each"

# A person who takes a while: back only after the whole answer (160 words, 3.2 s) was produced
# without them; the log keeps 150 words, so everything after an early id is still there.
last="$(leave_and_return ci-slow 4)"
grep -qi "^sse-replay: complete; events=$((160 - last))\b" "${work}/ci-slow.headers" \
  || fail "no complete replay after the answer's end: $(cat "${work}/ci-slow.headers")"
echo "demo replay: left after ${last} words, came back 4 s later (the answer done), got the other $((160 - last))"

curl -s -D "${work}/gap_headers" -H 'mcp-session-id: ci-chat' -H 'Last-Event-ID: 1' \
  "${url}/answer" >"${work}/gap"
grep -qi '^sse-replay: gap; reason=evicted' "${work}/gap_headers" \
  || fail "no gap header: $(cat "${work}/gap_headers")"
grep -q '^event: gap' "${work}/gap" || fail "no gap event"
echo "demo replay: an id older than the log got the gap header and event"
