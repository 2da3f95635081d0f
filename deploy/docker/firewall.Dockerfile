# The plant firewall between the field network and the DMZ: nftables rules from
# deploy/firewall/firewall.nft, forwarding only TCP 8883 and 443 to the broker. Needs
# NET_ADMIN and the sysctl net.ipv4.ip_forward=1 (see deploy/docker-compose.yml).
ARG BASE=bulwark/base:bookworm
FROM ${BASE}
COPY firewall/firewall.nft /etc/bulwark/nft/firewall.nft
COPY docker/firewall/entrypoint.sh /usr/local/sbin/bulwark-firewall-entrypoint
ENTRYPOINT ["/usr/local/sbin/bulwark-firewall-entrypoint"]
