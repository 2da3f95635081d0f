#!/usr/bin/env bash
# Builds the base image every Bulwark container image starts FROM, without any image
# registry: a minimal Debian bookworm made with debootstrap from the Debian package
# mirror, imported into Docker as bulwark/base:bookworm.
#
#   scripts/build-base-image.sh            # skipped when the image already exists
#   FORCE=1 scripts/build-base-image.sh    # rebuild it (fresh debootstrap)
#
# Needs root (debootstrap), debootstrap (apt-get install debootstrap) and a reachable
# Debian mirror (MIRROR, default http://deb.debian.org/debian; SECURITY_MIRROR, default
# http://deb.debian.org/debian-security). Takes about a minute.
#
# What is in it: Debian's minbase variant (the Essential packages plus apt) and what the
# images use: ca-certificates (and with it openssl, used by the tests' rogue clients),
# nftables and iproute2 (firewall rules and routes), openssh-server/-client (the gateways'
# sshd, the operator's ssh), procps, netcat-openbsd, adduser, brought up to date from
# bookworm-updates and bookworm-security. Documentation, manual pages,
# locales other than C, apt's lists and the downloaded packages are removed, and dpkg is
# told to leave documentation out of packages installed later (as Docker's
# debian:bookworm-slim does).
#
# With access to an image registry you do not need this: build the images with
#   docker build --build-arg BASE=debian:bookworm-slim ...
# after installing the same packages (each Dockerfile under deploy/docker/ says which it
# uses; `apt-get install -y --no-install-recommends ca-certificates nftables iproute2
# openssh-server openssh-client procps netcat-openbsd adduser`).
set -euo pipefail

IMAGE=${IMAGE:-bulwark/base:bookworm}
SUITE=${SUITE:-bookworm}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
SECURITY_MIRROR=${SECURITY_MIRROR:-http://deb.debian.org/debian-security}
PACKAGES=ca-certificates,nftables,iproute2,openssh-server,openssh-client,procps,netcat-openbsd,adduser

if [ "${FORCE:-0}" != 1 ] && docker image inspect "$IMAGE" >/dev/null 2>&1; then
    echo "$IMAGE exists (FORCE=1 rebuilds it)"
    exit 0
fi
if ! command -v debootstrap >/dev/null; then
    echo "error: debootstrap is not installed: apt-get install debootstrap" >&2
    exit 1
fi
if [ "$(id -u)" != 0 ]; then
    echo "error: debootstrap needs root: run as root (sudo $0)" >&2
    exit 1
fi

root=$(mktemp -d /tmp/bulwark-base.XXXXXX)
trap 'rm -rf "$root"' EXIT
start=$(date +%s)
echo "debootstrap $SUITE ($MIRROR) into $root ..."
debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$root" "$MIRROR" \
    >"$root.log" 2>&1 || {
    tail -n 30 "$root.log" >&2
    echo "error: debootstrap failed (full log: $root.log)" >&2
    exit 1
}
rm -f "$root.log"

# Security and stable updates (debootstrap installs the release as it was published).
cat >"$root/etc/apt/sources.list" <<SOURCES
deb $MIRROR $SUITE main
deb $MIRROR $SUITE-updates main
deb $SECURITY_MIRROR $SUITE-security main
SOURCES
# No service may start inside the chroot while packages are upgraded.
printf '#!/bin/sh\nexit 101\n' >"$root/usr/sbin/policy-rc.d"
chmod 0755 "$root/usr/sbin/policy-rc.d"
if ! chroot "$root" sh -c 'apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
    apt-get -y -qq -o Dpkg::Options::=--force-confold upgrade' >"$root.log" 2>&1; then
    tail -n 30 "$root.log" >&2
    echo "error: updating the base failed (full log: $root.log)" >&2
    exit 1
fi
upgraded=$(grep -c '^Unpacking' "$root.log" || true)
rm -f "$root.log" "$root/usr/sbin/policy-rc.d"

# Slim it down, and keep later package installs slim too.
cat >"$root/etc/dpkg/dpkg.cfg.d/docker-slim" <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-include /usr/share/locale/locale.alias
path-exclude /usr/share/lintian/*
EOF
cat >"$root/etc/apt/apt.conf.d/docker-clean" <<'EOF'
APT::Install-Recommends "false";
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/*.bin || true"; };
EOF
find "$root/usr/share/doc" -mindepth 1 -not -name copyright -not -type d -delete 2>/dev/null || true
find "$root/usr/share/doc" -mindepth 1 -type d -empty -delete 2>/dev/null || true
rm -rf "$root"/usr/share/man/* "$root"/usr/share/info/* "$root"/usr/share/lintian/*
find "$root/usr/share/locale" -mindepth 1 -maxdepth 1 -not -name locale.alias -exec rm -rf {} + 2>/dev/null || true
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/cache/apt/*.bin \
    "$root"/var/lib/apt/lists/* "$root"/var/log/* "$root"/tmp/* "$root"/var/tmp/*
# No host keys baked into the image: every gateway makes its own at first start.
rm -f "$root"/etc/ssh/ssh_host_*
# A container's hostname and resolver come from Docker.
rm -f "$root/etc/hostname" "$root/etc/resolv.conf"
# sources.list stays, so `apt-get update` works in Dockerfiles (the probe's nmap).

tar -C "$root" --numeric-owner -c . |
    docker import \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'CMD ["/bin/bash"]' \
        --message "debootstrap --variant=minbase $SUITE + $PACKAGES" \
        - "$IMAGE" >/dev/null
echo "built $IMAGE ($upgraded packages updated from $SUITE-updates/-security) in $(($(date +%s) - start)) s: $(docker image inspect -f '{{.Size}}' "$IMAGE" | awk '{printf "%.0f MB", $1/1e6}')"
