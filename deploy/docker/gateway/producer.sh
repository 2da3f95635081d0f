#!/bin/sh
# A stand-in for a plant program: hands the agent one reading every PRODUCER_INTERVAL
# seconds (default 0.2) on series line1/counter, payload {"n":N,"temp":T}. N counts from 1
# and moves on only once the agent has the record on disk, so the readings a consumer gets
# must be exactly 1, 2, 3, ... The last accepted N is in /run/producer/last.
set -u
interval=${PRODUCER_INTERVAL:-0.2}
n=1
while :; do
    temp="2$((n % 7)).$((n % 10))"
    if bulwark-agent send --socket /run/bulwark-agent/ingest.sock --series line1/counter \
        --json "{\"n\":$n,\"temp\":$temp}" >/dev/null 2>/run/producer/error; then
        echo "$n" >/run/producer/last.tmp && mv /run/producer/last.tmp /run/producer/last
        n=$((n + 1))
        sleep "$interval"
    else
        # The agent is not up yet (or restarting): try the same reading again.
        sleep 1
    fi
done
