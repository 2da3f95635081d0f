#!/bin/sh
# A machine on the field network that is not a gateway: a laptop plugged into the plant
# network, for scans and rogue clients (the tests use it; so can you):
#   docker exec <probe> nmap -n -Pn -p- --min-rate 5000 <broker address>
#   docker exec <probe> openssl s_client -connect broker.bulwark.test:8883 -CAfile /certs/ca.pem
# Like the gateways it routes everything through the firewall (FIREWALL_FIELD_IP), and
# keeps that route if its link goes down and comes back.
set -eu
: "${FIREWALL_FIELD_IP:?}"
while :; do
    ip route replace default via "$FIREWALL_FIELD_IP" 2>/dev/null || true
    sleep 2
done
