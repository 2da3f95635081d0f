# A field gateway: bulwark-agent installed from its Debian package (so `make compose-test`
# tests the package on every run), OpenSSH's sshd on loopback, nftables rules that drop
# every inbound connection, and a telemetry producer. Built by
# deploy/docker/build-images.sh from the staged context target/docker-context; with
# registry access --build-arg BASE=debian:bookworm-slim (plus nftables, iproute2 and
# openssh-server from the base list in scripts/build-base-image.sh).
#
# Users: bulwark-agent (the agent, from the package), producer (the producer, in group
# bulwark-agent for the ingest socket), admin (SSH login, key only). Only sshd and the
# start-up steps run as root.
ARG BASE=bulwark/base:bookworm
FROM ${BASE}
COPY deb/bulwark-agent.deb /tmp/bulwark-agent.deb
RUN set -eu; \
    dpkg -i /tmp/bulwark-agent.deb; rm /tmp/bulwark-agent.deb; \
    getent passwd bulwark-agent >/dev/null || \
        adduser --system --group --home /var/lib/bulwark-agent --no-create-home bulwark-agent; \
    adduser --system --group --home /nonexistent --no-create-home producer; \
    adduser producer bulwark-agent; \
    useradd --create-home --shell /bin/bash admin; usermod -p '*' admin; \
    install -d -o bulwark-agent -g bulwark-agent -m 0700 /var/lib/bulwark-agent; \
    rm -f /etc/ssh/ssh_host_*; \
    bulwark-agent --version
COPY firewall/gateway.nft /etc/bulwark/nft/gateway.nft
COPY docker/gateway/agent.toml.in docker/gateway/sshd_config /etc/bulwark/gateway/
COPY docker/gateway/producer.sh /usr/local/bin/producer.sh
COPY docker/gateway/entrypoint.sh /usr/local/sbin/bulwark-gateway-entrypoint
VOLUME ["/var/lib/bulwark-agent"]
ENTRYPOINT ["/usr/local/sbin/bulwark-gateway-entrypoint"]
