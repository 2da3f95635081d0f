#!/usr/bin/env bash
# Builds the images of the compose topology (deploy/docker-compose.yml) with no image
# registry: `make images` runs this, and so does the compose test when an image is missing.
#
#   1. the base image bulwark/base:bookworm (scripts/build-base-image.sh; skipped if present)
#   2. every binary (cargo build --workspace --bins, profile PROFILE: debug, or release),
#      then the Debian packages of the broker and the agent (scripts/build-deb.sh, as
#      `make deb` makes them) and bulwark-consumer and bulwark-tunnel as they are
#   3. a small build context in target/docker-context: the two packages, the two binaries
#      (stripped), deploy/docker/*/ and deploy/firewall/*.nft; nothing else is sent to Docker
#   4. docker build of bulwark/{broker,gateway,firewall,consumer,probe}:TAG (TAG: local)
#
# Environment: BASE (default bulwark/base:bookworm; debian:bookworm-slim with registry
# access), TAG, PROFILE, BUILD_DEB (default scripts/build-deb.sh), CARGO (default cargo),
# IMAGES (default "broker gateway firewall consumer probe").
set -euo pipefail
cd "$(dirname "$0")/../.."
BASE=${BASE:-bulwark/base:bookworm}
TAG=${TAG:-local}
PROFILE=${PROFILE:-debug}
BUILD_DEB=${BUILD_DEB:-scripts/build-deb.sh}
CARGO=${CARGO:-cargo}
IMAGES=${IMAGES:-broker gateway firewall consumer probe}
ctx=target/docker-context
start=$(date +%s)

if [ "$BASE" = bulwark/base:bookworm ]; then
    scripts/build-base-image.sh
fi

[ -x "$BUILD_DEB" ] || {
    echo "error: $BUILD_DEB not found: it builds the broker's and the agent's Debian packages" >&2
    exit 1
}
# One build of every binary, the way `make build` does it: building single packages with
# -p would pick other dependency features and recompile half the workspace each time.
cargo_profile=()
[ "$PROFILE" = release ] && cargo_profile=(--release)
"$CARGO" build --quiet "${cargo_profile[@]}" --workspace --bins
debs=$(NO_BUILD=1 PROFILE="$PROFILE" "$BUILD_DEB" all)
broker_deb=$(printf '%s\n' "$debs" | grep -E '/bulwark-broker_[^/]*\.deb$' | tail -n 1 || true)
agent_deb=$(printf '%s\n' "$debs" | grep -E '/bulwark-agent_[^/]*\.deb$' | tail -n 1 || true)
if [ ! -f "$broker_deb" ] || [ ! -f "$agent_deb" ]; then
    echo "error: $BUILD_DEB all did not name both packages; it printed:" >&2
    printf '%s\n' "$debs" >&2
    exit 1
fi

rm -rf "$ctx"
mkdir -p "$ctx/deb" "$ctx/bin" "$ctx/docker" "$ctx/firewall"
cp "$broker_deb" "$ctx/deb/bulwark-broker.deb"
cp "$agent_deb" "$ctx/deb/bulwark-agent.deb"
for bin in bulwark-consumer bulwark-tunnel; do
    if command -v strip >/dev/null; then
        strip -o "$ctx/bin/$bin" "target/$PROFILE/$bin"
    else
        cp "target/$PROFILE/$bin" "$ctx/bin/$bin"
    fi
done
for d in broker gateway firewall consumer probe; do
    cp -r "deploy/docker/$d" "$ctx/docker/$d"
done
cp deploy/firewall/*.nft "$ctx/firewall/"
echo "build context $ctx: $(du -sh "$ctx" | cut -f1)"

for img in $IMAGES; do
    t=$(date +%s)
    log=$ctx/build-$img.log
    if ! docker build --force-rm --build-arg BASE="$BASE" -f "deploy/docker/$img.Dockerfile" \
        -t "bulwark/$img:$TAG" "$ctx" >"$log" 2>&1; then
        tail -n 40 "$log" >&2
        echo "error: docker build of bulwark/$img failed (log: $log)" >&2
        exit 1
    fi
    size=$(docker image inspect -f '{{.Size}}' "bulwark/$img:$TAG" | awk '{printf "%.0f MB", $1/1e6}')
    echo "built bulwark/$img:$TAG ($size) in $(($(date +%s) - t)) s"
done
echo "images built in $(($(date +%s) - start)) s"
