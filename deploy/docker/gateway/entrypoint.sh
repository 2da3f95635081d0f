#!/bin/sh
# Start of a field gateway container, in the order a real gateway boots:
#   1. nftables rules (deploy/firewall/gateway.nft): no inbound connection, outbound to
#      the broker only; loaded before anything listens
#   2. default route via the firewall (kept in place if the link goes down and comes back,
#      as the network configuration of a real gateway would)
#   3. sshd on 127.0.0.1:22, key login for user admin only
#   4. the agent's certificate and key, readable by group bulwark-agent only
#   5. the producer, as user producer (group bulwark-agent, so it may use the ingest socket)
#   6. the agent (installed from its Debian package), as user bulwark-agent with no
#      capabilities
#
# Environment (set by deploy/docker-compose.yml):
#   DEVICE_ID          the device id = CN of the device certificate, e.g. gw-1
#   BROKER_IP          the broker's address (DMZ), for the outbound rule
#   FIREWALL_FIELD_IP  the firewall's address on the field network: the default route
# Mounted read-only at /certs: ca.pem, device.pem, device.key, operator_ssh.pub.
set -eu
: "${DEVICE_ID:?DEVICE_ID must be set}" "${BROKER_IP:?}" "${FIREWALL_FIELD_IP:?}"

nft -D broker="$BROKER_IP" -f /etc/bulwark/nft/gateway.nft

ip route replace default via "$FIREWALL_FIELD_IP"
(
    while sleep 2; do
        ip route replace default via "$FIREWALL_FIELD_IP" 2>/dev/null || true
    done
) &

[ -f /etc/ssh/ssh_host_ed25519_key ] || ssh-keygen -q -t ed25519 -N '' -f /etc/ssh/ssh_host_ed25519_key
install -d -m 0755 /run/sshd
install -d -o admin -g admin -m 0700 /home/admin/.ssh
install -o admin -g admin -m 0600 /certs/operator_ssh.pub /home/admin/.ssh/authorized_keys
/usr/sbin/sshd -f /etc/bulwark/gateway/sshd_config -E /var/log/sshd.log

install -d -m 0750 -g bulwark-agent /etc/bulwark/tls
install -m 0644 /certs/ca.pem /etc/bulwark/tls/ca.pem
install -m 0644 /certs/device.pem /etc/bulwark/tls/device.pem
install -m 0640 -g bulwark-agent /certs/device.key /etc/bulwark/tls/device.key
sed "s/@DEVICE_ID@/$DEVICE_ID/" /etc/bulwark/gateway/agent.toml.in >/etc/bulwark/agent.toml
install -d -o bulwark-agent -g bulwark-agent -m 0750 /run/bulwark-agent
install -d -o bulwark-agent -g bulwark-agent -m 0700 /var/lib/bulwark-agent
bulwark-agent check-config /etc/bulwark/agent.toml >/dev/null

install -d -o producer -g producer -m 0755 /run/producer
setpriv --reuid=producer --regid=producer --init-groups --no-new-privs \
    --bounding-set=-all --inh-caps=-all /usr/local/bin/producer.sh &

exec setpriv --reuid=bulwark-agent --regid=bulwark-agent --init-groups --no-new-privs \
    --bounding-set=-all --inh-caps=-all -- \
    bulwark-agent --log-format "${BULWARK_LOG_FORMAT:-json}" run --config /etc/bulwark/agent.toml
