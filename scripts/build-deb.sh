#!/usr/bin/env bash
# Builds the Debian packages bulwark-broker and bulwark-agent (`make deb`).
#
#   scripts/build-deb.sh [broker|agent|all]      (default: all)
#
# Prints the path of every .deb it wrote on stdout, one per line, and nothing else there
# (cargo's and dpkg-deb's messages go to stderr), so other scripts can do
#   deb=$(scripts/build-deb.sh agent)
# Output: target/debian/bulwark-broker_<version>_<arch>.deb and
#         target/debian/bulwark-agent_<version>_<arch>.deb
# <version> is [workspace.package] version in Cargo.toml ('-' becomes '~', so that
# 1.0.0-rc.1 sorts before 1.0.0 in dpkg); <arch> is `dpkg --print-architecture`.
#
# Why dpkg-deb and not cargo-deb: dpkg-deb is part of dpkg, on every Debian and Ubuntu
# machine, so building a package needs no extra tool to install (cargo-deb would be one
# more crate to compile in CI, and a Docker build without registry access could not get
# it). The package layout lives in deploy/debian/ (control templates, conffiles, maintainer
# scripts), deploy/systemd/ (units) and deploy/examples/ (the configuration files).
#
# Environment:
#   PROFILE=debug|release  which cargo profile's binaries to package. Default debug, so
#                          CI compiles the workspace once: this workspace's dev profile is
#                          already optimised (opt-level 1, dependencies at 2; see
#                          [profile.dev] in Cargo.toml). PROFILE=release for packages you
#                          ship to a plant (a second, longer build into target/release).
#   NO_BUILD=1             package the binaries as they are; by default `cargo build -p
#                          <package>` runs first (a no-op when nothing changed).
#   STRIP=0                keep the debug line tables in the binaries (default: stripped
#                          with `strip --strip-debug`: symbol names stay in backtraces and
#                          the packages are several times smaller).
#   VERSION=x.y.z          override the package version (e.g. to test upgrades).
#   DEB_MAINTAINER="Name <mail>"  the Maintainer field.
#   CARGO, CARGO_TARGET_DIR       as for cargo.
#
# Depends: computed from the binaries themselves. They link only glibc (libc, libm, the
# dynamic loader) and libgcc_s (unwinding); the highest GLIBC_x.y and GCC_x.y symbol
# versions they use give `libc6 (>= x.y), libgcc-s1 (>= x.y)`, the same answer
# dpkg-shlibdeps gives, without the debian/ source tree it needs. A binary linking any
# other library stops the build with a message, so the list never silently goes wrong.
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$(pwd)
# Directories and files in the package get 0755/0644 whatever the caller's umask.
umask 022
STAGE=
trap 'rm -rf "$STAGE"' EXIT

log() { echo "build-deb: $*" >&2; }
die() {
    echo "build-deb: error: $*" >&2
    exit 1
}

WHAT=${1:-all}
case "$WHAT" in
broker) PACKAGES=(bulwark-broker) ;;
agent) PACKAGES=(bulwark-agent) ;;
all) PACKAGES=(bulwark-broker bulwark-agent) ;;
-h | --help)
    sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2
    exit 0
    ;;
*) die "unknown package '$WHAT'; use broker, agent or all" ;;
esac

for tool in dpkg-deb dpkg objdump strip gzip md5sum; do
    command -v "$tool" >/dev/null || die "$tool not found (Debian: apt-get install dpkg binutils gzip coreutils)"
done

CARGO=${CARGO:-cargo}
PROFILE=${PROFILE:-debug}
case "$PROFILE" in
debug | dev) PROFILE_DIR=debug CARGO_PROFILE=() ;;
release) PROFILE_DIR=release CARGO_PROFILE=(--release) ;;
*) die "PROFILE=$PROFILE: use debug or release" ;;
esac
TARGET_DIR=${CARGO_TARGET_DIR:-target}
case "$TARGET_DIR" in /*) ;; *) TARGET_DIR="$ROOT/$TARGET_DIR" ;; esac
BIN_DIR="$TARGET_DIR/$PROFILE_DIR"
OUT_DIR="$TARGET_DIR/debian"

# [workspace.package] version = "x.y.z" in the root Cargo.toml.
cargo_version=$(awk '
    /^\[/ { in_ws = ($0 == "[workspace.package]") }
    in_ws && /^version *=/ { gsub(/.*= *"|".*/, ""); print; exit }
' Cargo.toml)
[ -n "$cargo_version" ] || die "no version in [workspace.package] of Cargo.toml"
VERSION=${VERSION:-${cargo_version//-/\~}}
ARCH=$(dpkg --print-architecture)
MAINTAINER=${DEB_MAINTAINER:-Bulwark developers <bulwark@example.invalid>}
HOMEPAGE=$(awk '
    /^\[/ { in_ws = ($0 == "[workspace.package]") }
    in_ws && /^repository *=/ { gsub(/.*= *"|".*/, ""); print; exit }
' Cargo.toml)
HOMEPAGE=${HOMEPAGE:-https://github.com/bulwark-mqtt/bulwark}

# Reproducible archives: every file gets the time of the last commit (or now, outside
# git), so the same binaries give the same .deb (and Docker layers stay cached).
if [ -z "${SOURCE_DATE_EPOCH:-}" ]; then
    SOURCE_DATE_EPOCH=$(git log -1 --format=%ct 2>/dev/null || date +%s)
fi
export SOURCE_DATE_EPOCH

# The Debian Depends of a set of ELF binaries (see the header).
depends_of() {
    local lib glibc gcc deps
    for lib in $(objdump -p "$@" | awk '$1 == "NEEDED" { print $2 }' | sort -u); do
        case "$lib" in
        libc.so.* | libm.so.* | ld-linux*.so.* | ld64.so.* | libpthread.so.* | libdl.so.* | librt.so.* | libutil.so.*) ;;
        libgcc_s.so.*) ;;
        *) die "$* links $lib, which build-deb.sh does not know: add its Debian package in depends_of()" ;;
        esac
    done
    glibc=$(objdump -T "$@" | grep -o 'GLIBC_[0-9][0-9.]*' | sed 's/GLIBC_//' | sort -uV | tail -n 1)
    [ -n "$glibc" ] || die "no GLIBC symbol versions in $*: not a glibc binary?"
    deps="libc6 (>= $glibc)"
    if objdump -p "$@" | awk '$1 == "NEEDED"' | grep -q 'libgcc_s\.so'; then
        gcc=$(objdump -T "$@" | grep -o 'GCC_[0-9][0-9.]*' | sed 's/GCC_//' | sort -uV | tail -n 1)
        gcc=$(echo "${gcc:-3.0}" | cut -d. -f1,2)
        deps="$deps, libgcc-s1 (>= $gcc)"
    fi
    echo "$deps"
}

# Sections of README.md (by their "## " heading) for /usr/share/doc/<package>/README.md.
readme_excerpt() {
    local pkg=$1
    shift
    echo "# $pkg"
    echo
    echo "Excerpt of the Bulwark README. The example configuration files are installed in"
    echo "/etc/bulwark; the systemd unit is /lib/systemd/system/$pkg.service."
    local heading
    for heading in "$@"; do
        echo
        awk -v h="## $heading" '
            $0 == h { on = 1; print; next }
            on && /^## / { exit }
            on { print }
        ' README.md
    done
}

build_one() {
    local pkg=$1 crates bins unit conffiles docs
    case "$pkg" in
    bulwark-broker)
        crates=(bulwark-broker bulwark-pki)
        bins=(bulwark-broker bulwark-pki)
        unit=deploy/systemd/bulwark-broker.service
        conffiles=(deploy/examples/broker.toml deploy/examples/acl.conf)
        docs=("Installing on real hosts" "The broker" "Remote sessions (reverse tunnel)")
        ;;
    bulwark-agent)
        crates=(bulwark-agent)
        bins=(bulwark-agent)
        unit=deploy/systemd/bulwark-agent.service
        conffiles=(deploy/examples/agent.toml)
        docs=("Installing on real hosts" "The edge agent")
        ;;
    esac

    if [ "${NO_BUILD:-0}" != 1 ]; then
        local pflags=() c
        for c in "${crates[@]}"; do pflags+=(-p "$c"); done
        log "$CARGO build ${CARGO_PROFILE[*]} ${pflags[*]} --bins"
        # cargo writes only to stderr; keep stdout for the paths.
        "$CARGO" build "${CARGO_PROFILE[@]}" "${pflags[@]}" --bins >&2
    fi
    local b
    for b in "${bins[@]}"; do
        [ -x "$BIN_DIR/$b" ] || die "$BIN_DIR/$b not found; build it (cargo build ${CARGO_PROFILE[*]} -p $b) or drop NO_BUILD=1"
    done

    mkdir -p "$OUT_DIR"
    local stage
    stage=$(mktemp -d "$OUT_DIR/.stage-$pkg.XXXXXX")
    STAGE=$stage
    chmod 0755 "$stage"

    # Files, with the modes they get on the target (owner root: dpkg-deb --root-owner-group).
    install -d -m 0755 "$stage/DEBIAN" "$stage/usr/bin" "$stage/lib/systemd/system" \
        "$stage/etc/bulwark" "$stage/usr/share/doc/$pkg"
    for b in "${bins[@]}"; do
        install -m 0755 "$BIN_DIR/$b" "$stage/usr/bin/$b"
        if [ "${STRIP:-1}" != 0 ]; then
            strip --strip-debug "$stage/usr/bin/$b"
        fi
    done
    install -m 0644 "$unit" "$stage/lib/systemd/system/$pkg.service"
    local f
    for f in "${conffiles[@]}"; do
        install -m 0644 "$f" "$stage/etc/bulwark/$(basename "$f")"
    done
    sed "s|@HOMEPAGE@|$HOMEPAGE|" deploy/debian/copyright >"$stage/usr/share/doc/$pkg/copyright"
    readme_excerpt "$pkg" "${docs[@]}" >"$stage/usr/share/doc/$pkg/README.md"
    gzip -9n <CHANGELOG.md >"$stage/usr/share/doc/$pkg/changelog.gz"
    if [ "$pkg" = bulwark-agent ]; then
        install -d -m 0755 "$stage/usr/share/doc/$pkg/examples"
        install -m 0644 deploy/systemd/bulwark-agent.service.d/broker-address.conf.example \
            "$stage/usr/share/doc/$pkg/examples/broker-address.conf.example"
    fi
    chmod 0644 "$stage/usr/share/doc/$pkg/"*.* "$stage/usr/share/doc/$pkg/copyright"

    # Control area.
    local depends installed_size
    depends=$(depends_of "${bins[@]/#/$stage/usr/bin/}")
    installed_size=$(du -sk --apparent-size --exclude=DEBIAN "$stage" | cut -f1)
    sed -e "s|@VERSION@|$VERSION|" -e "s|@ARCH@|$ARCH|" -e "s|@MAINTAINER@|$MAINTAINER|" \
        -e "s|@INSTALLED_SIZE@|$installed_size|" -e "s|@DEPENDS@|$depends|" \
        -e "s|@HOMEPAGE@|$HOMEPAGE|" "deploy/debian/$pkg/control.in" >"$stage/DEBIAN/control"
    if grep -q '@[A-Z_]*@' "$stage/DEBIAN/control"; then
        die "deploy/debian/$pkg/control.in: unreplaced placeholder"
    fi
    install -m 0644 "deploy/debian/$pkg/conffiles" "$stage/DEBIAN/conffiles"
    for f in postinst prerm postrm; do
        install -m 0755 "deploy/debian/$pkg/$f" "$stage/DEBIAN/$f"
    done
    (cd "$stage" && find . -path ./DEBIAN -prune -o -type f -printf '%P\0' | LC_ALL=C sort -z |
        xargs -0 md5sum) >"$stage/DEBIAN/md5sums"
    chmod 0644 "$stage/DEBIAN/md5sums"
    find "$stage" -exec touch -h -d "@$SOURCE_DATE_EPOCH" {} +

    # Written under a temporary name and renamed, so a reader never sees half a package.
    local deb="$OUT_DIR/${pkg}_${VERSION}_${ARCH}.deb"
    dpkg-deb --root-owner-group -Zxz --build "$stage" "$deb.tmp" >&2
    mv -f "$deb.tmp" "$deb"
    rm -rf "$stage"
    log "$pkg $VERSION ($ARCH, $PROFILE_DIR binaries, Depends: $depends): $(du -h "$deb" | cut -f1)"
    echo "$deb"
}

for p in "${PACKAGES[@]}"; do
    build_one "$p"
done
