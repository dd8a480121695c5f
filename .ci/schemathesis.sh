#!/usr/bin/env bash
# Schemathesis against a live `cowvm serve`: every operation of /openapi.json is driven with
# generated valid and invalid requests (`--checks all`), and any failure fails CI.
#
# The server runs with a token (so the spec's bearer scheme and 401s are exercised) and small
# limits (so a run stays short); the spec it serves describes exactly those limits. The guest
# deadline is raised from 5 s so that a clone's first run on a heavily loaded machine does not
# count as a stuck guest.
# Usage: .ci/schemathesis.sh [path to the cowvm binary]   (default: target/release/cowvm)
set -euo pipefail
cd "$(dirname "$0")/.."

SCHEMATHESIS_VERSION=4.32.5
EXAMPLES=${SCHEMATHESIS_EXAMPLES:-25}
COWVM=${1:-target/release/cowvm}
VENV=${SCHEMATHESIS_VENV:-target/schemathesis-venv}

if [ ! -x "$VENV/bin/st" ] || ! "$VENV/bin/st" --version | grep -qF "$SCHEMATHESIS_VERSION"; then
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install --quiet --disable-pip-version-check "schemathesis==$SCHEMATHESIS_VERSION"
fi
st=$(realpath "$VENV/bin/st")

work=$(mktemp -d)
server_pid=
st_pid=
cleanup() {
    if [ -n "$st_pid" ]; then
        kill "$st_pid" 2>/dev/null || true
        wait "$st_pid" 2>/dev/null || true
    fi
    if [ -n "$server_pid" ]; then
        kill "$server_pid" 2>/dev/null || true
        wait "$server_pid" 2>/dev/null || true
    fi
    rm -rf "$work"
}
trap cleanup EXIT
trap "exit 130" INT TERM

chmod 700 "$work"
token=$(python3 -c 'import secrets; print(secrets.token_hex(16))')
(umask 077 && printf '%s\n' "$token" > "$work/token")

# A free loopback port: bind port 0, read it, release it.
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
"$COWVM" serve --listen "127.0.0.1:$port" --state-dir "$work/state" --token-file "$work/token" \
    --max-vms 6 --max-clones-per-call 4 --max-memory-mib 32 --warm-shells 0 --guest-deadline-ms 15000 \
    > "$work/server.log" 2>&1 &
server_pid=$!

for _ in $(seq 100); do
    grep -q "listening on" "$work/server.log" && break
    kill -0 "$server_pid" 2>/dev/null || { cat "$work/server.log" >&2; exit 1; }
    sleep 0.1
done

status=0
# Answers may be slow on a loaded machine; the server itself bounds every request by its request
# timeout (60 s), so that is the response-time limit too.
config=$(realpath .ci/schemathesis.toml)
cd "$work" # schemathesis writes its report directory here
"$st" --config-file "$config" run "http://127.0.0.1:$port/openapi.json" \
    --header "Authorization: Bearer $token" \
    --checks all \
    --max-examples "$EXAMPLES" \
    --seed 1 \
    --workers 2 \
    --max-response-time 61 \
    --request-timeout 90 \
    --no-color &
# In the background and waited for, so that a signal to this script ends the run at once.
st_pid=$!
wait "$st_pid" || status=$?
st_pid=
if [ "$status" -ne 0 ]; then
    echo "schemathesis: failures (exit $status); server log:" >&2
    tail -n 50 "$work/server.log" >&2
fi
exit "$status"
