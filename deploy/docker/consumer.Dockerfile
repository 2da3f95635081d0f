# The enterprise side: bulwark-consumer (telemetry to a JSON-lines file, user
# bulwark-consumer) and the operator's bulwark-tunnel and ssh (user operator).
ARG BASE=bulwark/base:bookworm
FROM ${BASE}
COPY bin/bulwark-consumer bin/bulwark-tunnel /usr/local/bin/
RUN set -eu; \
    adduser --system --group --home /var/lib/bulwark-consumer --no-create-home bulwark-consumer; \
    useradd --create-home --shell /bin/bash --gid operator operator; \
    install -d -o bulwark-consumer -g bulwark-consumer -m 0700 /var/lib/bulwark-consumer; \
    bulwark-consumer --help >/dev/null; \
    bulwark-tunnel --version
COPY docker/consumer/tunnel.toml docker/consumer/ssh_config /etc/bulwark/enterprise/
COPY docker/consumer/entrypoint.sh /usr/local/sbin/bulwark-consumer-entrypoint
VOLUME ["/var/lib/bulwark-consumer"]
ENTRYPOINT ["/usr/local/sbin/bulwark-consumer-entrypoint"]
