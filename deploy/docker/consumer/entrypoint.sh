#!/bin/sh
# Start of the enterprise container: the telemetry consumer, and the operator's tools.
#
# The consumer (user bulwark-consumer) subscribes to every device's telemetry with
# certificate app1 and writes each new record as one JSON line to
# /var/lib/bulwark-consumer/received.jsonl (duplicates dropped by device and seq):
#   docker exec <consumer> tail -f /var/lib/bulwark-consumer/received.jsonl
#
# The operator (user operator, certificate alice) opens SSH sessions to the gateways
# through the broker's tunnel relay; ~operator/.ssh/config and
# ~operator/.config/bulwark/tunnel.toml are set up here:
#   docker exec -it -u operator <consumer> ssh gw-1
#
# Mounted read-only at /certs: ca.pem, app1.pem/.key, alice.pem/.key, operator_ssh(.pub).
set -eu

install -d -o bulwark-consumer -g bulwark-consumer -m 0700 /etc/bulwark-consumer /var/lib/bulwark-consumer
install -o bulwark-consumer -g bulwark-consumer -m 0600 /certs/app1.key /etc/bulwark-consumer/app1.key

home=/home/operator
install -d -o operator -g operator -m 0700 "$home/.ssh" "$home/.config" "$home/.config/bulwark"
install -o operator -g operator -m 0644 /certs/ca.pem "$home/.config/bulwark/ca.pem"
install -o operator -g operator -m 0644 /certs/alice.pem "$home/.config/bulwark/alice.pem"
install -o operator -g operator -m 0600 /certs/alice.key "$home/.config/bulwark/alice.key"
install -o operator -g operator -m 0644 /etc/bulwark/enterprise/tunnel.toml "$home/.config/bulwark/tunnel.toml"
install -o operator -g operator -m 0600 /certs/operator_ssh "$home/.ssh/id_ed25519"
install -o operator -g operator -m 0644 /etc/bulwark/enterprise/ssh_config "$home/.ssh/config"

exec setpriv --reuid=bulwark-consumer --regid=bulwark-consumer --init-groups --no-new-privs \
    --bounding-set=-all --inh-caps=-all -- \
    bulwark-consumer --broker mqtts://broker.bulwark.test:8883 --ca-file /certs/ca.pem \
    --cert /certs/app1.pem --key /etc/bulwark-consumer/app1.key \
    --topic 'devices/+/data/#' --out /var/lib/bulwark-consumer/received.jsonl --quiet
