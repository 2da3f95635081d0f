#!/usr/bin/env bash
# `make compose-up`: starts the compose topology (images and certificates must exist:
# make images, deploy/docker/compose-certs.sh), waits until telemetry flows, and prints
# where to look. Project name: COMPOSE_PROJECT (default bulwark).
set -euo pipefail
cd "$(dirname "$0")/../.."
project=${COMPOSE_PROJECT:-bulwark}
net=${BULWARK_NET:-10.231}
c="deploy/docker/compose.sh -f deploy/docker-compose.yml -p $project"
$c up -d
# The commands below name the tool compose.sh picks, so they can be pasted as they are.
if command -v docker-compose >/dev/null 2>&1; then
    shown="docker-compose -f deploy/docker-compose.yml -p $project"
else
    shown="docker compose -f deploy/docker-compose.yml -p $project"
fi

echo "waiting for the first records at the consumer ..."
for _ in $(seq 1 60); do
    if $c exec -T consumer test -s /var/lib/bulwark-consumer/received.jsonl 2>/dev/null; then
        break
    fi
    sleep 1
done
$c ps
c=$shown

cat <<MSG

Bulwark compose topology "$project" is up:
  field      $net.1.0/24   gw-1 .11, gw-2 .12 (agent + producer, no open port), probe .50
  firewall   $net.1.2 / $net.2.2 (forwards field -> broker tcp 8883, 443 only)
  dmz        $net.2.0/24   broker .10 (8883 MQTT/TLS, 443 WebSocket/TLS + tunnel relay)
  enterprise $net.3.0/24   broker .10, consumer + operator .20

What the consumer receives (one JSON line per record, duplicates dropped):
  $c exec consumer tail -f /var/lib/bulwark-consumer/received.jsonl

SSH to a gateway through the reverse tunnel, as the operator on the enterprise network
(certificate alice; ssh runs bulwark-tunnel as its ProxyCommand, see ~operator/.ssh/config):
  $c exec -u operator consumer ssh gw-1
  $c exec -u operator consumer ssh -o ProxyCommand='bulwark-tunnel stdio --device gw-1 --service ssh' admin@gw-1 uptime

Audit trail (connects, refusals, tunnel sessions):
  $c logs -f broker | grep '"target":"audit"'
  $c exec broker bulwark-broker ctl --socket /run/bulwark/ctl.sock sessions
Health and status topics:
  $c exec -u bulwark-consumer consumer bulwark-consumer --broker mqtts://broker.bulwark.test:8883 \\
      --ca-file /certs/ca.pem --cert /certs/app1.pem --key /etc/bulwark-consumer/app1.key \\
      --client-id app1-look --clean-session --topic 'devices/+/health' --topic 'devices/+/status'
The firewall's rules and drop counters, and a scan from the field:
  $c exec firewall nft list table inet bulwark_firewall
  $c exec probe nmap -n -Pn -p- --min-rate 20000 $net.2.10 $net.1.11

Stop and remove everything (containers, networks, volumes): make compose-down
MSG
