#!/usr/bin/env bash
# Certificates and keys of the compose topology, made on the host with bulwark-pki:
#   deploy/docker/compose-certs.sh [STATE_DIR]      (default deploy/.compose)
#
# STATE_DIR/certs       the development PKI (bulwark-pki's layout): CA, the broker's
#                       certificate for broker.bulwark.test, clients gw-1 and gw-2
#                       (devices), app1 (the consumer), alice (the operator); existing
#                       files are kept, so running this again changes nothing
# STATE_DIR/ssh         the operator's SSH key pair (ed25519)
# STATE_DIR/tls/NAME    what each container gets, mounted read-only at /certs (never the
#                       CA key): broker, gw-1, gw-2, consumer, probe
#
# Revoke a certificate and let the running broker pick it up (within two seconds):
#   target/debug/bulwark-pki revoke gw-2 --dir deploy/.compose/certs
#   deploy/docker/compose-certs.sh
# The whole STATE_DIR is git-ignored (it writes its own .gitignore).
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
state=${1:-$root/deploy/.compose}
pki_bin=${BULWARK_PKI_BIN:-$root/target/debug/bulwark-pki}
[ -x "$pki_bin" ] || {
    echo "error: $pki_bin not found: cargo build -p bulwark-pki (make build)" >&2
    exit 1
}
command -v ssh-keygen >/dev/null || {
    echo "error: ssh-keygen not found: apt-get install openssh-client" >&2
    exit 1
}

mkdir -p "$state"
[ -f "$state/.gitignore" ] || echo '*' >"$state/.gitignore"
pki=$state/certs
"$pki_bin" init --dir "$pki" --server-name broker.bulwark.test \
    --client gw-1 --client gw-2 --client app1 --client alice >/dev/null
mkdir -p "$state/ssh"
[ -f "$state/ssh/operator" ] ||
    ssh-keygen -q -t ed25519 -N '' -C operator@bulwark-compose -f "$state/ssh/operator"

stage() { # stage CONTAINER SOURCE:NAME:MODE ...
    local dir=$state/tls/$1 spec src name mode
    shift
    mkdir -p "$dir"
    chmod 0755 "$dir"
    for spec in "$@"; do
        IFS=: read -r src name mode <<<"$spec"
        # Write next to the target and rename: a process watching the file sees either
        # the old or the new content, never half of it.
        install -m "$mode" "$src" "$dir/.$name.tmp"
        mv -f "$dir/.$name.tmp" "$dir/$name"
    done
}
stage broker "$pki/ca.pem:ca.pem:0644" "$pki/crl.pem:crl.pem:0644" \
    "$pki/server.pem:server.pem:0644" "$pki/server.key:server.key:0600"
for gw in gw-1 gw-2; do
    stage "$gw" "$pki/ca.pem:ca.pem:0644" "$pki/clients/$gw.pem:device.pem:0644" \
        "$pki/clients/$gw.key:device.key:0600" "$state/ssh/operator.pub:operator_ssh.pub:0644"
done
stage consumer "$pki/ca.pem:ca.pem:0644" \
    "$pki/clients/app1.pem:app1.pem:0644" "$pki/clients/app1.key:app1.key:0600" \
    "$pki/clients/alice.pem:alice.pem:0644" "$pki/clients/alice.key:alice.key:0600" \
    "$state/ssh/operator:operator_ssh:0600" "$state/ssh/operator.pub:operator_ssh.pub:0644"
stage probe "$pki/ca.pem:ca.pem:0644"
echo "certificates for the compose topology in $state/tls (PKI: $pki)"
