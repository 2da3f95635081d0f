# The broker image: bulwark-broker installed from its Debian package (scripts/build-deb.sh)
# onto the locally made base (scripts/build-base-image.sh). Built by
# deploy/docker/build-images.sh from the staged context target/docker-context:
#   docker build -f deploy/docker/broker.Dockerfile -t bulwark/broker:local target/docker-context
# With registry access: --build-arg BASE=debian:bookworm-slim (it needs iproute2 from the
# base list in scripts/build-base-image.sh).
#
# The entrypoint runs as root only to set a route and hand the key to user bulwark; the
# broker runs as bulwark with CAP_NET_BIND_SERVICE alone. Run outside compose with, e.g.:
#   docker run -v $PWD/deploy/.compose/tls/broker:/certs:ro -p 8883:8883 -p 443:443 \
#       bulwark/broker:local
ARG BASE=bulwark/base:bookworm
FROM ${BASE}
COPY deb/bulwark-broker.deb /tmp/bulwark-broker.deb
RUN set -eu; \
    dpkg -i /tmp/bulwark-broker.deb; rm /tmp/bulwark-broker.deb; \
    getent passwd bulwark >/dev/null || \
        adduser --system --group --home /var/lib/bulwark --no-create-home bulwark; \
    test -d /var/lib/bulwark; \
    bulwark-broker --version
COPY docker/broker/broker.toml docker/broker/acl.conf /etc/bulwark/compose/
COPY docker/broker/entrypoint.sh /usr/local/sbin/bulwark-broker-entrypoint
EXPOSE 8883 443
VOLUME ["/var/lib/bulwark"]
ENTRYPOINT ["/usr/local/sbin/bulwark-broker-entrypoint"]
