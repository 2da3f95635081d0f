# A machine on the field network that is not a gateway (a laptop on the plant network):
# nmap for port scans, openssl (from the base) for rogue TLS clients. nmap comes from the
# Debian mirror when the image is built.
ARG BASE=bulwark/base:bookworm
FROM ${BASE}
RUN set -eu; apt-get update -qq; \
    apt-get install -y -qq --no-install-recommends nmap >/dev/null; \
    rm -rf /var/lib/apt/lists/*; nmap --version | head -n 1
COPY docker/probe/entrypoint.sh /usr/local/sbin/bulwark-probe-entrypoint
ENTRYPOINT ["/usr/local/sbin/bulwark-probe-entrypoint"]
