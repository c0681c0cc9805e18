#!/usr/bin/env bash
# Functions shared by the benchmark scripts (sourced; expects DIR, BIN and a PIDS array).

die() { echo "bench: $*" >&2; exit 1; }

free_port() {
    local p
    for _ in $(seq 200); do
        p=$((20000 + RANDOM % 40000))
        if [ -z "$(ss -Htan "sport = :$p")" ]; then echo "$p"; return 0; fi
    done
    die "no free port found"
}

wait_listen() { # PORT PID NAME
    for _ in $(seq 300); do
        [ -n "$(ss -Hltn "sport = :$1")" ] && return 0
        kill -0 "$2" 2>/dev/null || die "$3 exited before listening on 127.0.0.1:$1 (see $DIR/*.log)"
        sleep 0.1
    done
    die "$3 not listening on 127.0.0.1:$1 after 30 s"
}

# wait_addr NAME PID OUTFILE: the address a program started with port 0 prints as
# `listening on ADDR` on its stdout (redirected to OUTFILE).
wait_addr() {
    local addr
    for _ in $(seq 300); do
        addr=$(sed -n 's/^listening on //p' "$3" | head -1)
        if [ -n "$addr" ]; then echo "$addr"; return 0; fi
        kill -0 "$2" 2>/dev/null || die "$1 exited: $(tail -5 "$DIR/$1.log" 2>/dev/null)"
        sleep 0.1
    done
    die "$1 did not report its address within 30 s"
}
