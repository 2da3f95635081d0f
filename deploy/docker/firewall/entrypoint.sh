#!/bin/sh
# Start of the firewall container: load deploy/firewall/firewall.nft for this topology's
# addresses, remove the route Docker gives every container to the outside (the firewall
# routes between field and DMZ only), print the rules, then idle as user nobody with no
# capabilities. Forwarding itself is the sysctl net.ipv4.ip_forward=1 from the compose file.
#
#   docker exec <firewall> nft list table inet bulwark_firewall    # rules and drop counters
#
# Environment (set by deploy/docker-compose.yml): FIELD_SUBNET, DMZ_SUBNET, BROKER_IP.
set -eu
: "${FIELD_SUBNET:?}" "${DMZ_SUBNET:?}" "${BROKER_IP:?}"

nft -D field_net="$FIELD_SUBNET" -D dmz_net="$DMZ_SUBNET" -D broker="$BROKER_IP" \
    -f /etc/bulwark/nft/firewall.nft
while ip route del default 2>/dev/null; do :; done
if [ "$(cat /proc/sys/net/ipv4/ip_forward)" != 1 ]; then
    echo "error: IP forwarding is off: run the container with --sysctl net.ipv4.ip_forward=1" >&2
    exit 1
fi
echo "firewall: forwarding $FIELD_SUBNET -> $BROKER_IP tcp 8883, 443 only"
nft list table inet bulwark_firewall
exec setpriv --reuid=nobody --regid=nogroup --clear-groups --no-new-privs \
    --bounding-set=-all --inh-caps=-all -- sleep infinity
