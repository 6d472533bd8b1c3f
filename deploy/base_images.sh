#!/usr/bin/env bash
# Local stand-ins for the base images, built from Debian 12 packages (debootstrap + docker import),
# for machines that cannot pull from a registry. Images already present are kept (FORCE=1 rebuilds).
#   rnnserve-base:bookworm        Python 3.11, venv, Java 17, curl: the Dockerfile's BASE, which an
#                                 air-gapped build needs (it cannot apt-get Java)
#   rnnserve-prometheus:bookworm  Debian's prometheus laid out like prom/prometheus (entry point
#                                 /bin/prometheus, user nobody, /prometheus, wget for the healthcheck)
#   rnnserve-redis:bookworm       Debian's redis-server (and redis-cli for the healthcheck), user redis
# DEBIAN_MIRROR defaults to the first Debian mirror in apt's sources (a local mirror works).
set -euo pipefail
BASE_IMAGE=${RNNSERVE_BASE_IMAGE:-rnnserve-base:bookworm}
PROMETHEUS_IMAGE=${PROMETHEUS_IMAGE:-rnnserve-prometheus:bookworm}
REDIS_IMAGE=${REDIS_IMAGE:-rnnserve-redis:bookworm}
mirror=${DEBIAN_MIRROR:-$( { grep -rhoE 'https?://[^ ]+/debian/?( |$)' /etc/apt/sources.list /etc/apt/sources.list.d/ 2>/dev/null || true; } | head -1 | tr -d ' ')}
mirror=${mirror:-http://deb.debian.org/debian}

# build NAME PACKAGES [docker import --change ...]: a minbase Debian 12 root with PACKAGES, as NAME
build() {
  local name=$1 packages=$2; shift 2
  if [ -z "${FORCE:-}" ] && docker image inspect "$name" >/dev/null 2>&1; then
    echo "$name: present, kept"; return
  fi
  local root start=$SECONDS
  root=$(mktemp -d /var/tmp/rnnserve-rootfs.XXXXXX)
  if ! debootstrap --variant=minbase --include="$packages" bookworm "$root" "$mirror" >"$root.log" 2>&1; then
    tail -20 "$root.log" >&2; rm -rf "$root" "$root.log"
    echo "debootstrap of $name from $mirror failed" >&2; return 1
  fi
  rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
  [ "$name" != "$PROMETHEUS_IMAGE" ] || install -d -o 65534 -g 65534 "$root/prometheus"
  tar -C "$root" -c . | docker import "$@" - "$name" >/dev/null
  rm -rf "$root" "$root.log"
  echo "$name: built from Debian packages ($mirror) in $((SECONDS - start)) s"
}

build "$BASE_IMAGE" python3,python3-venv,openjdk-17-jre-headless,curl,ca-certificates
build "$PROMETHEUS_IMAGE" prometheus,wget \
  --change 'ENTRYPOINT ["/bin/prometheus"]' \
  --change 'CMD ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus"]' \
  --change 'USER nobody' --change 'WORKDIR /prometheus' --change 'EXPOSE 9090'
build "$REDIS_IMAGE" redis-server \
  --change 'CMD ["redis-server"]' --change 'USER redis' --change 'WORKDIR /var/lib/redis' --change 'EXPOSE 6379'
