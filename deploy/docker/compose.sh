#!/bin/sh
# Runs Docker Compose, whichever this machine has: the standalone docker-compose (v1 or
# v2) or the `docker compose` plugin. The one place the Makefile and the tests choose.
if command -v docker-compose >/dev/null 2>&1; then
    exec docker-compose "$@"
elif docker compose version >/dev/null 2>&1; then
    exec docker compose "$@"
fi
echo "error: neither docker-compose nor the docker compose plugin is installed" \
    "(Debian: apt-get install docker-compose)" >&2
exit 127
