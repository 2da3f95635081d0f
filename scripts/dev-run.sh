#!/usr/bin/env bash
# `make run`: the whole system on loopback, as local processes — the broker, two field
# gateways (agent + producer each: gw-1, gw-2) and the enterprise consumer (app1) — with
# development certificates created on first use. The consumer's output is streamed here;
# everything else logs to data/logs/. Ctrl-C (or SIGTERM) stops it all.
#
# Ports: 8883 (MQTT/TLS), 8443 (secure WebSocket: MQTT at /mqtt, tunnel relay at
# /tunnel/v1), 127.0.0.1:11883 (plain, loopback only). Data under data/ (git-ignored).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-target/debug}
CERTS=certs/dev
DATA=data
LOGS=$DATA/logs
GATEWAYS=(gw-1 gw-2)

# Build what is missing (`make run` has built already).
for b in bulwark-broker bulwark-agent bulwark-pki bulwark-tunnel bulwark-consumer; do
    if [ ! -x "$BIN/$b" ]; then
        cargo build --workspace --bins
        break
    fi
done

# Development PKI: CA, server certificate (localhost), clients app1 (the consumer),
# gw-1 and gw-2 (the devices) and alice (an operator). Existing files are kept.
"$BIN/bulwark-pki" init --dir "$CERTS" --client app1 --client gw-1 --client gw-2 --client alice >/dev/null
for c in app1 "${GATEWAYS[@]}" alice; do
    [ -f "$CERTS/clients/$c.pem" ] || "$BIN/bulwark-pki" issue-client "$c" --dir "$CERTS" >/dev/null
done

mkdir -p "$DATA" "$LOGS" && chmod 700 "$DATA"
for g in "${GATEWAYS[@]}"; do mkdir -p "$DATA/$g"; done
"$BIN/bulwark-broker" check-config deploy/dev/broker.toml >/dev/null
for g in "${GATEWAYS[@]}"; do "$BIN/bulwark-agent" check-config "deploy/dev/agent-$g.toml" >/dev/null; done

# Log files without colour codes.
export NO_COLOR=1

PIDS=()   # in start order; stopped in reverse
NAMES=()
start() { # NAME LOGFILE COMMAND...: start a background process (log rewritten), remember it
    local name=$1 log=$2
    shift 2
    "$@" >"$log" 2>&1 &
    PIDS+=("$!")
    NAMES+=("$name")
}

STOPPING=
TICK=
stop() { # [EXIT_CODE]
    local code=${1:-0}
    [ -n "$STOPPING" ] && return
    STOPPING=1
    trap '' INT TERM
    if [ -n "$TICK" ]; then kill "$TICK" 2>/dev/null || true; fi
    echo "stopping..." >&2
    local i pid n
    # Producers, then agents (they announce "agent stopped" on their status topic), the
    # consumer, the broker last; each gets SIGTERM and up to 10 s before SIGKILL.
    for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do
        pid=${PIDS[i]}
        kill -TERM "$pid" 2>/dev/null || continue
        for ((n = 0; n < 100; n++)); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        if kill -0 "$pid" 2>/dev/null; then
            echo "${NAMES[i]} did not stop within 10 s: killed" >&2
            kill -KILL "$pid" 2>/dev/null || true
        fi
        wait "$pid" 2>/dev/null || true
    done
    echo "stopped"
    exit "$code"
}
trap 'stop 0' INT TERM

# The broker: wait until it is up (its control socket appears after the listeners).
rm -f "$DATA/ctl.sock"
start broker "$LOGS/broker.log" "$BIN/bulwark-broker" run --config deploy/dev/broker.toml
for ((n = 0; ; n++)); do
    [ -S "$DATA/ctl.sock" ] && break
    if ! kill -0 "${PIDS[0]}" 2>/dev/null || [ "$n" -ge 300 ]; then
        echo "error: the broker did not start; the end of $LOGS/broker.log:" >&2
        tail -n 15 "$LOGS/broker.log" >&2
        echo "(a port in use? another \`make run\` or a Mosquitto on 8883/8443/11883)" >&2
        stop 1
    fi
    sleep 0.1
done

CONSUMER=("$BIN/bulwark-consumer" --broker mqtts://localhost:8883 --ca-file "$CERTS/ca.pem"
    --cert "$CERTS/clients/app1.pem" --key "$CERTS/clients/app1.key")
OPERATOR=(--broker wss://localhost:8443 --ca-file "$CERTS/ca.pem"
    --cert "$CERTS/clients/alice.pem" --key "$CERTS/clients/alice.key")
TLS_APP1=(--cafile "$CERTS/ca.pem" --cert "$CERTS/clients/app1.pem" --key "$CERTS/clients/app1.key")

cat <<MSG

Bulwark on loopback: broker, gateways ${GATEWAYS[*]} (agent + producer each; no inbound port),
consumer app1 over mutual TLS. What app1 receives follows below; Ctrl-C stops everything.

  broker        mqtts://localhost:8883, wss://localhost:8443/mqtt, tunnel relay wss://localhost:8443/tunnel/v1
  records       $DATA/consumer.jsonl (one JSON line per record, duplicates dropped by (device, seq))
  audit log     $DATA/audit.log
  process logs  $LOGS/ (broker.log, gw-1.log, producer-gw-1.log, ...)
  operations    $BIN/bulwark-broker ctl --socket $DATA/ctl.sock sessions

Gateway health and status, in another terminal:
MSG
if command -v mosquitto_sub >/dev/null 2>&1; then
    cat <<MSG
  mosquitto_sub -h localhost -p 8883 ${TLS_APP1[*]} \\
      -t 'devices/+/health' -t 'devices/+/status' -v
MSG
else
    cat <<MSG
  ${CONSUMER[*]} \\
      --client-id app1-watch --clean-session --topic 'devices/+/health' --topic 'devices/+/status'
MSG
fi
cat <<MSG

SSH into gw-1 through the reverse tunnel, as operator alice (the gateway's ssh service is
127.0.0.1:22, so this needs an sshd on this machine):
  $BIN/bulwark-tunnel ${OPERATOR[*]} \\
      open --device gw-1 --service ssh --listen 127.0.0.1:2222
  ssh -p 2222 ${USER:-$(id -un)}@127.0.0.1
(its web service, 127.0.0.1:8080: open --device gw-1 --service web --listen 127.0.0.1:8081)

MSG

# The consumer first, so its session exists before the gateways publish.
"${CONSUMER[@]}" --out "$DATA/consumer.jsonl" \
    --topic 'devices/+/data/#' --topic 'devices/+/status' --topic 'devices/+/audit' &
PIDS+=("$!")
NAMES+=(consumer)

for g in "${GATEWAYS[@]}"; do
    start "$g" "$LOGS/$g.log" "$BIN/bulwark-agent" run --config "deploy/dev/agent-$g.toml"
done

# The producers start once the agents' ingest sockets are there.
for g in "${GATEWAYS[@]}"; do
    for ((n = 0; n < 100; n++)); do
        [ -S "$DATA/$g/ingest.sock" ] && break
        sleep 0.1
    done
done

producer() { # GATEWAY OFFSET: two series, one record each per second
    local socket=$DATA/$1/ingest.sock n=$2 t p temp bar child=
    trap 'kill "$child" 2>/dev/null; exit 0' TERM
    while :; do
        t=$((200 + (n * 3) % 40)) # tenths of a degree: 20.0 .. 23.9
        p=$((200 + (n * 7) % 25)) # hundredths of a bar: 2.00 .. 2.24
        printf -v temp '%d.%d' $((t / 10)) $((t % 10))
        printf -v bar '%d.%02d' $((p / 100)) $((p % 100))
        "$BIN/bulwark-agent" send --socket "$socket" --series line1/temp --json "$temp" || true
        "$BIN/bulwark-agent" send --socket "$socket" --series line1/pressure \
            --json "{\"bar\":$bar}" || true
        n=$((n + 1))
        sleep 1 &
        child=$!
        wait "$child" || true
    done
}
offset=0
for g in "${GATEWAYS[@]}"; do
    start "producer-$g" "$LOGS/producer-$g.log" producer "$g" "$offset"
    offset=$((offset + 5))
done

# Until Ctrl-C or SIGTERM, or until a process ends on its own; then everything stops. (A
# shell started with SIGINT ignored cannot trap it, but the Rust programs still stop on
# it: a process that ends with status 0 was asked to, and the rest follow.)
while :; do
    sleep 1 &
    TICK=$!
    wait "$TICK" || true # returns at once on a trapped signal
    for i in "${!PIDS[@]}"; do
        kill -0 "${PIDS[i]}" 2>/dev/null && continue
        status=0
        wait "${PIDS[i]}" || status=$?
        if [ "$status" -eq 0 ]; then
            echo "${NAMES[i]} stopped" >&2
            stop 0
        elif [ "${NAMES[i]}" = consumer ]; then
            echo "error: the consumer stopped unexpectedly, status $status (its message is above)" >&2
        else
            echo "error: ${NAMES[i]} stopped unexpectedly, status $status (see $LOGS/${NAMES[i]}.log)" >&2
        fi
        stop 1
    done
done
