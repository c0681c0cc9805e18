#!/usr/bin/env bash
# Fetches the pinned Debian packages of iso-builder/packages.lock into a cache directory and
# unpacks them (dpkg -x, no install) into <cache>/root. Idempotent: does nothing when the cache
# already matches the lock file. Usage: fetch-inputs.sh [CACHE_DIR] (default target/iso-inputs).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
lock="$here/packages.lock"
cache="${1:-$here/../target/iso-inputs}"
mkdir -p "$cache"
cache="$(cd "$cache" && pwd)"
stamp="$cache/.lock-sha256"
want="$(sha256sum "$lock" | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -d "$cache/root/boot" ]; then
	exit 0
fi
debs="$cache/debs"
rm -rf "$debs" "$cache/root" "$stamp" "$cache/versions.txt"
mkdir -p "$debs" "$cache/root"
# apt-get download runs as _apt when it can; make the directory writable for it.
chmod 0777 "$debs"
updated=0
fetch() { (cd "$debs" && apt-get download -q "$1" >/dev/null 2>"$cache/apt-err.log"); }
while IFS= read -r line; do
	line="${line%%#*}"; line="$(echo "$line" | tr -d '[:space:]')"
	[ -n "$line" ] || continue
	name="${line%%=*}"; version="${line#*=}"
	if ! fetch "$name=$version"; then
		if [ $updated = 0 ]; then apt-get update -qq || true; updated=1; fi
		if ! fetch "$name=$version"; then
			# The pinned version is gone from the archive (normal for bookworm-security).
			case "$name" in
			linux-image-*-amd64)
				name="$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')";;
			esac
			echo "WARNING: $line is no longer in the Debian archive; using the current $name instead" >&2
			fetch "$name" || { echo "error: apt-get download $name failed:" >&2; cat "$cache/apt-err.log" >&2; exit 1; }
		fi
	fi
done <"$lock"
for deb in "$debs"/*.deb; do
	dpkg -x "$deb" "$cache/root"
	dpkg-deb -f "$deb" Package Version | sed 's/^[^:]*: //' | paste -sd' ' >>"$cache/versions.txt"
done
rm -rf "$debs"
echo "$want" >"$stamp"
echo "iso inputs ready in $cache:"
sed 's/^/  /' "$cache/versions.txt"
