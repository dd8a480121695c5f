#!/usr/bin/env bash
# One pre-warmed test VM per test, with cowvm: start the server, build the template once,
# clone it for each test, run the test in the guest, collect stats, clean up.
#
#   COWVM=path/to/cowvm TESTS=5 docs/examples/ci-clone-per-test.sh
#
# Needs only the cowvm binary and python3 (to read the CLI's JSON).
set -euo pipefail

COWVM=${COWVM:-cowvm}
TESTS=${TESTS:-5}
MEMORY_MIB=${MEMORY_MIB:-256}
work=$(mktemp -d)

# 1. Start the server on a free loopback port; stop it (and every VM) on exit.
"$COWVM" serve --listen 127.0.0.1:0 --warm-shells 0 > "$work/serve.log" &
server=$!
cleanup() { kill -TERM "$server" 2>/dev/null || true; wait "$server" 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
for _ in $(seq 200); do grep -q "listening on" "$work/serve.log" && break; sleep 0.05; done
COWVM_URL=$(sed -n 's/.*listening on //p' "$work/serve.log")
export COWVM_URL
field() { python3 -c "import json, sys; d = json.load(sys.stdin); print($1)"; }

# 2. Build the template once: boot, pre-warm (the guest fills 32 MiB with data), snapshot,
#    and keep one warm shell per test ready so that every clone starts in microseconds.
vm=$("$COWVM" vm create --memory-mib "$MEMORY_MIB" --warmup-mib 32 --json | field 'd["id"]')
template=$("$COWVM" snapshot "$vm" --json | field 'd["template_id"]')
"$COWVM" vm rm "$vm"
"$COWVM" template warm "$template" --shells "$TESTS" --wait > /dev/null
echo "template $template ready (${MEMORY_MIB} MiB, pre-warmed)"

# 3. One clone per test.
for i in $(seq "$TESTS"); do
    clone=$("$COWVM" clone "$template" --count 1 --json)
    id=$(echo "$clone" | field 'd["clones"][0]["id"]')
    spawn=$(echo "$clone" | field 'round(d["clones"][0]["spawn_us"])')
    # The "test": the guest checksums 64 pre-warmed pages, then writes 16 pages of its own.
    sum=$("$COWVM" vm run "$id" --command checksum --start-gpa 0x800000 --count 64 --stride 4096 --json | field 'hex(d["result"])')
    "$COWVM" vm run "$id" --command write --start-gpa 0x1000000 --count 16 --stride 4096 --value "$i" > /dev/null
    private=$("$COWVM" stats "$id" --json | field 'd["pages"]["private"]')
    echo "test $i: $id spawned in ${spawn} µs, checksum $sum, $private private pages (from pagemap)"
    "$COWVM" vm rm "$id"
done

# 4. Clean up the template; the trap stops the server.
"$COWVM" template rm "$template"
echo "ran $TESTS tests"
