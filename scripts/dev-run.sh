#!/usr/bin/env bash
# `make run`: development certificates on first use, then the broker in the foreground,
# with the exact client commands that reach it.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-target/debug}
"$BIN/bulwark-pki" init --dir certs/dev --client app1 >/dev/null
[ -f certs/dev/clients/app1.pem ] || "$BIN/bulwark-pki" issue-client app1 --dir certs/dev
mkdir -p data && chmod 700 data
"$BIN/bulwark-broker" check-config deploy/dev/broker.toml
cat <<MSG

Bulwark broker (development) — TLS 8883, secure WebSocket 8443/mqtt, loopback plain 11883.
In another terminal, subscribe and publish with the development client certificate:

  mosquitto_sub -h localhost -p 8883 --cafile certs/dev/ca.pem \\
      --cert certs/dev/clients/app1.pem --key certs/dev/clients/app1.key -t 'plant/#' -v
  mosquitto_pub -h localhost -p 8883 --cafile certs/dev/ca.pem \\
      --cert certs/dev/clients/app1.pem --key certs/dev/clients/app1.key -t plant/line1/temp -m 21.5 -q 1

Broker figures: add  -t '\$SYS/#'  to the subscription.
Who may do what: deploy/dev/acl.conf (default deny); try
  target/debug/bulwark-broker acl check --acl deploy/dev/acl.conf --user app1 plant/x write
Operations: target/debug/bulwark-broker ctl --socket data/ctl.sock sessions
Audit log: data/audit.log.  Deployment check: target/debug/bulwark-broker doctor --config deploy/dev/broker.toml
Stop with Ctrl-C.

MSG
exec "$BIN/bulwark-broker" run --config deploy/dev/broker.toml
