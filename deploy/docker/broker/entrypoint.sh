#!/bin/sh
# Start of the broker container. As root, with the few capabilities the container is
# given: route the field network back through the firewall, remove every other way out,
# hand the server key to the broker's user. Then the broker runs as user `bulwark` with
# no capability but CAP_NET_BIND_SERVICE (ports 443 and 8883) and no way to gain one.
#
# Environment (set by deploy/docker-compose.yml):
#   FIELD_SUBNET       the field network, e.g. 10.231.1.0/24
#   FIREWALL_DMZ_IP    the firewall's address in the DMZ, e.g. 10.231.2.2
set -eu

if [ -n "${FIELD_SUBNET:-}" ]; then
    : "${FIREWALL_DMZ_IP:?FIREWALL_DMZ_IP must be set with FIELD_SUBNET}"
    ip route replace "$FIELD_SUBNET" via "$FIREWALL_DMZ_IP"
    # The broker talks to its own networks and the field only: no default route.
    while ip route del default 2>/dev/null; do :; done
fi

install -d -o bulwark -g bulwark -m 0700 /run/bulwark /run/bulwark/tls
install -o bulwark -g bulwark -m 0600 /certs/server.key /run/bulwark/tls/server.key
install -d -o bulwark -g bulwark -m 0700 /var/lib/bulwark /var/log/bulwark

run_as_bulwark() {
    exec setpriv --reuid=bulwark --regid=bulwark --init-groups --no-new-privs \
        --bounding-set=-all,+net_bind_service --inh-caps=-all,+net_bind_service \
        --ambient-caps=-all,+net_bind_service -- "$@"
}

if [ "$#" -gt 0 ]; then
    run_as_bulwark "$@"
fi
run_as_bulwark /usr/bin/bulwark-broker --log-format "${BULWARK_LOG_FORMAT:-json}" \
    run --config /etc/bulwark/compose/broker.toml
