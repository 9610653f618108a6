#!/usr/bin/env bash
# The demo drains its open streams and exits within a second of Ctrl-C (SIGINT) with a client
# connected (issue #13). The client must get a whole last event and the `retry:` the demo sets.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --quiet --example axum_server
work="$(mktemp -d)"
./target/debug/examples/axum_server 127.0.0.1:0 >"$work/server" 2>&1 &
server=$!
for _ in $(seq 300); do grep -q "listening on" "$work/server" && break; sleep 0.1; done
url="$(sed -n 's/.*listening on \(http:[^ ]*\).*/\1/p' "$work/server")"
curl -sN -H 'mcp-session-id: ci-drain' "$url/events" >"$work/client" &
client=$!
for _ in $(seq 300); do grep -q '^id:' "$work/client" && break; sleep 0.1; done
start="$(date +%s%N)"
kill -INT "$server"
status=0
wait "$server" || status=$?
end="$(date +%s%N)"
wait "$client" || true
ms=$(( (end - start) / 1000000 ))
events="$(grep -c '^id:' "$work/client" || true)"
echo "demo exited (status ${status}) ${ms} ms after SIGINT; its client got ${events} events, then:"
tail -n 3 "$work/client"
tail -n 2 "$work/server"
[ "${status}" -eq 0 ] && [ "${events}" -gt 0 ] && [ "${ms}" -lt 1000 ] \
  && grep -q '^retry: 1000' "$work/client"
