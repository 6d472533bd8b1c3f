#!/usr/bin/env bash
# make docker-smoke: builds the CPU image from ./Dockerfile with no network, starts the compose stack
# (docker-compose.yml + docker-compose.cpu.yml) and checks it from the outside, then removes
# everything it started, on failure too. From nothing on Debian 12 as root (or with sudo): installs
# docker.io and debootstrap, starts dockerd when none answers (and stops it again), fetches Compose
# v2 into .tools/, and builds local stand-ins for the base images that no registry can give here.
# One line per check; exit 0 only when all passed, 77 when this machine cannot run containers.
#
# Settings (environment): SMOKE_READY_TIMEOUT_S (600), SMOKE_KEEP_DOCKERD=1 (leave a dockerd this
# script started running), SMOKE_KEEP_IMAGE=1 (keep the built image), RNNSERVE_BASE_IMAGE and
# PROMETHEUS_IMAGE and REDIS_IMAGE (stand-ins to use; built when missing), GRAFANA_IMAGE.
set -euo pipefail
cd "$(dirname "$0")/.."

PROJECT=rnnserve-smoke
IMAGE=rnnserve-smoke:cpu
export RNNSERVE_BASE_IMAGE=${RNNSERVE_BASE_IMAGE:-rnnserve-base:bookworm}
export PROMETHEUS_IMAGE=${PROMETHEUS_IMAGE:-rnnserve-prometheus:bookworm}
export REDIS_IMAGE=${REDIS_IMAGE:-rnnserve-redis:bookworm}
GRAFANA_IMAGE=${GRAFANA_IMAGE:-grafana/grafana:11.2.0}
READY_TIMEOUT=${SMOKE_READY_TIMEOUT_S:-600}
PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}
STATE=$(mktemp -d /tmp/rnnserve-smoke.XXXXXX)
START=$SECONDS
SUDO=$([ "$(id -u)" = 0 ] || echo "sudo -n")
DOCKERD_PID=
DC=
up_pid=

ok()   { printf 'ok    %s\n' "$*"; }
skip() { printf 'skip  %s\n' "$*"; }
info() { printf '      %s\n' "$*"; }
fail() { printf 'FAIL  %s\n' "$*" >&2; exit 1; }
# exit 77: no container engine can be installed or started here, so nothing was checked
no_engine() { printf 'skip  this machine cannot run containers (%s): nothing checked\n' "$*" >&2; exit 77; }
# the last lines of every container's log, for a failure's context
dump_logs() {
  [ -n "$DC" ] || return 0
  $DC ps -a >&2 || true
  for svc in torchserve gateway prometheus grafana; do
    local id; id=$($DC ps -aq "$svc" 2>/dev/null || true)
    [ -n "$id" ] || continue
    printf -- '--- %s (last 25 log lines)\n' "$svc" >&2
    docker logs --tail 25 "$id" >&2 2>&1 || true
  done
}

teardown() {
  local rc=$?
  set +e
  trap - EXIT INT TERM
  [ -z "${up_pid:-}" ] || kill "$up_pid" 2>/dev/null
  [ "$rc" = 0 ] || [ "$rc" = 77 ] || dump_logs
  if [ -n "$DC" ]; then
    $DC down --volumes --remove-orphans --timeout 10 >"$STATE/down.log" 2>&1 || cat "$STATE/down.log" >&2
    local left
    left=$(docker ps -aq --filter "label=com.docker.compose.project=$PROJECT"; \
           docker network ls -q --filter "label=com.docker.compose.project=$PROJECT"; \
           docker volume ls -q --filter "label=com.docker.compose.project=$PROJECT")
    if [ -z "$left" ]; then ok "teardown: no container, network or volume of project $PROJECT left"
    else printf 'FAIL  teardown left: %s\n' "$left" >&2; rc=1; fi
  fi
  if docker info >/dev/null 2>&1; then
    [ -n "${SMOKE_KEEP_IMAGE:-}" ] || docker rmi -f "$IMAGE" >/dev/null 2>&1
    docker image prune -f --filter label=org.rnnserve.stage=build >/dev/null 2>&1
  fi
  if [ -n "$DOCKERD_PID" ] && [ -z "${SMOKE_KEEP_DOCKERD:-}" ]; then
    $SUDO kill "$DOCKERD_PID" 2>/dev/null
    for _ in $(seq 30); do kill -0 "$DOCKERD_PID" 2>/dev/null || break; sleep 1; done
    info "stopped the dockerd this script started (pid $DOCKERD_PID)"
  fi
  if [ "$rc" = 0 ]; then
    rm -rf "$STATE"
    printf 'PASS  docker smoke in %d s\n' "$((SECONDS - START))"
  elif [ "$rc" = 77 ]; then
    rm -rf "$STATE"
  else
    printf 'FAIL  docker smoke failed after %d s; logs in %s\n' "$((SECONDS - START))" "$STATE" >&2
  fi
  exit "$rc"
}
trap teardown EXIT
trap 'exit 130' INT TERM

# one smoke at a time on a machine: they would share the project name and the stand-ins
exec 9<"$0"
flock -n 9 || fail "another docker smoke is running (it holds a lock on $0)"

# --- what it needs -----------------------------------------------------------------------------
need=()
command -v dockerd >/dev/null || need+=(docker.io)
command -v debootstrap >/dev/null || need+=(debootstrap)
if [ ${#need[@]} -gt 0 ]; then
  { $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" \
    || { $SUDO apt-get update -qq && $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}"; }; } \
    >"$STATE/apt.log" 2>&1 || { tail -5 "$STATE/apt.log" >&2; no_engine "apt-get install ${need[*]} failed"; }
  ok "installed ${need[*]} (Debian packages)"
fi

if docker info >/dev/null 2>&1; then
  ok "docker engine answers: $(docker version -f '{{.Server.Version}}' 2>/dev/null)"
else
  $SUDO dockerd >"$STATE/dockerd.log" 2>&1 &
  DOCKERD_PID=$!
  for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; kill -0 "$DOCKERD_PID" 2>/dev/null || break; sleep 1; done
  if ! docker info >/dev/null 2>&1; then
    tail -5 "$STATE/dockerd.log" >&2
    DOCKERD_PID=
    no_engine "dockerd did not start"
  fi
  ok "started dockerd $(docker version -f '{{.Server.Version}}' 2>/dev/null) (pid $DOCKERD_PID)"
fi

COMPOSE=$(deploy/compose.sh 2>"$STATE/compose.log") || { cat "$STATE/compose.log" >&2; fail "no Docker Compose v2"; }
ok "$("$COMPOSE" version)"
export GRAFANA_ADMIN_PASSWORD
GRAFANA_ADMIN_PASSWORD=$("$PYTHON" -c 'import secrets; print(secrets.token_hex(16))')
export RNNSERVE_IMAGE=$IMAGE
export RNNSERVE_GATEWAY_PORT
RNNSERVE_GATEWAY_PORT=$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
DC="$COMPOSE -p $PROJECT -f docker-compose.yml -f docker-compose.cpu.yml"
$DC config -q || fail "docker compose config rejects the compose files"
ok "docker compose config accepts docker-compose.yml + docker-compose.cpu.yml"
# leftovers of an interrupted run (SIGKILL leaves no time for the trap)
$DC down --volumes --remove-orphans --timeout 5 >/dev/null 2>&1 || true

# --- the images ----------------------------------------------------------------------------------
deploy/base_images.sh >"$STATE/base.log" 2>&1 || { tail -20 "$STATE/base.log" >&2; fail "make base-image failed"; }
while read -r line; do ok "stand-in base image $line"; done <"$STATE/base.log"

if [ "$(cat wheelhouse/VARIANT 2>/dev/null)" = cpu ] && [ wheelhouse/VARIANT -nt pyproject.toml ]; then
  ok "wheelhouse/ (cpu) is newer than pyproject.toml: reused"
else
  deploy/wheelhouse.sh cpu >"$STATE/wheelhouse.log" 2>&1 || { tail -20 "$STATE/wheelhouse.log" >&2; fail "make wheelhouse VARIANT=cpu failed"; }
  ok "$(tail -1 "$STATE/wheelhouse.log")"
fi

t=$SECONDS
# the classic builder: Debian 12's docker.io has no buildx; --network none proves the build is offline
DOCKER_BUILDKIT=0 docker build --network none --build-arg BASE="$RNNSERVE_BASE_IMAGE" --build-arg VARIANT=cpu \
  -t "$IMAGE" . >"$STATE/build.log" 2>&1 || { tail -30 "$STATE/build.log" >&2; fail "docker build of ./Dockerfile failed (log: $STATE/build.log)"; }
ok "built $IMAGE from ./Dockerfile with no network (--network none, wheelhouse/, BASE=$RNNSERVE_BASE_IMAGE) in $((SECONDS - t)) s, $(docker image inspect -f '{{.Size}}' "$IMAGE" | awk '{printf "%.2f GB", $1 / 1e9}')"

services=(torchserve redis gateway prometheus)
if docker image inspect "$GRAFANA_IMAGE" >/dev/null 2>&1 || timeout 30 docker pull -q "$GRAFANA_IMAGE" >/dev/null 2>&1; then
  services+=(grafana)
  export GRAFANA_IMAGE GRAFANA_PORT
  GRAFANA_PORT=$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
else
  skip "grafana: $GRAFANA_IMAGE is not on this machine and cannot be pulled (no registry reachable), and Grafana has no Debian package to stand in"
fi
if ! docker image inspect "$PROMETHEUS_IMAGE" >/dev/null 2>&1; then fail "no $PROMETHEUS_IMAGE image"; fi
if ! docker image inspect "$REDIS_IMAGE" >/dev/null 2>&1; then fail "no $REDIS_IMAGE image"; fi

# --- the stack -----------------------------------------------------------------------------------
t=$SECONDS
# in the background: `up` waits for healthchecks, while this loop sees a crash at once
$DC up -d --no-build --pull never "${services[@]}" >"$STATE/up.log" 2>&1 &
up_pid=$!
up_rc=
url=http://127.0.0.1:$RNNSERVE_GATEWAY_PORT
while :; do
  if [ -z "$up_rc" ] && ! kill -0 "$up_pid" 2>/dev/null; then
    wait "$up_pid" && up_rc=0 || up_rc=$?
    [ "$up_rc" = 0 ] || { tail -5 "$STATE/up.log" >&2; fail "docker compose up failed (exit $up_rc): $(grep -iE 'error|unhealthy|failed' "$STATE/up.log" | tail -1)"; }
  fi
  for id in $($DC ps -aq); do
    read -r name status code restarts < <(docker inspect -f '{{.Name}} {{.State.Status}} {{.State.ExitCode}} {{.RestartCount}}' "$id" 2>/dev/null) || continue
    if [ "$status" = exited ] || [ "$status" = dead ] || [ "$restarts" -gt 0 ]; then
      fail "container ${name#/} stopped (status $status, exit code $code, restarts $restarts): $(docker logs --tail 3 "$id" 2>&1 | tr '\n' ' ')"
    fi
  done
  [ "$up_rc" = 0 ] && curl -fsS -o /dev/null "$url/readyz" 2>/dev/null && break
  [ $((SECONDS - t)) -lt "$READY_TIMEOUT" ] || fail "$url/readyz not ready after $READY_TIMEOUT s: $(curl -sS "$url/readyz" 2>&1 | head -c 300)"
  sleep 2
done
ok "stack up (${services[*]}); GET $url/readyz is 200 after $((SECONDS - t)) s"

# check_stream ROUTE BODY: POSTs BODY once with stream=true and once without, and checks what holds on any
# machine however fast it decodes: an event stream of at least one event, none an error, the last with a
# finish_reason, a closing [DONE], and the streamed text equal to the plain answer's text. It prints a summary.
check_stream() {
  local route=$1 body=$2 out="$STATE/$(basename "$1")"
  curl -sS -N --max-time 120 -D "$out.sse.headers" -H 'Content-Type: application/json' \
    -d "$("$PYTHON" -c 'import json, sys; print(json.dumps({**json.loads(sys.argv[1]), "stream": True}))' "$body")" \
    "$url$route" >"$out.sse" || fail "POST $route (stream): $(tail -c 300 "$out.sse")"
  curl -sS --max-time 120 -H 'Content-Type: application/json' -d "$body" "$url$route" >"$out.json" \
    || fail "POST $route: $(tail -c 300 "$out.json")"
  "$PYTHON" - "$out" <<'PY'
import json, sys
out = sys.argv[1]
raw = open(out + ".sse").read()
headers = open(out + ".sse.headers").read().lower()
if "content-type: text/event-stream" not in headers:
    sys.exit(f"not an event stream: {headers.splitlines()[0] if headers else 'no headers'}; body {raw[:300]!r}")
events = [line[len("data: "):] for line in raw.splitlines() if line.startswith("data: ")]
if len(events) < 2 or events[-1] != "[DONE]":
    sys.exit(f"expected at least one event and a closing [DONE], got {events[-3:]!r}")
frames = [json.loads(e) for e in events[:-1]]
if any("error" in f for f in frames):
    sys.exit(f"the stream carried an error: {[f for f in frames if 'error' in f][0]}")
last = frames[-1]
streamed = "".join(f.get("text", "") for f in frames)
if not streamed.strip() or not last.get("finish_reason"):
    sys.exit(f"no text or no finish_reason in the stream: {last}")
plain = json.load(open(out + ".json"))
whole = plain["translations"][0]["text"] if "translations" in plain else plain.get("text")
if streamed != whole:
    sys.exit(f"streamed text {streamed!r} differs from the plain answer's {whole!r}")
if "translation" in last and last["translation"]["text"] != whole:
    sys.exit(f"the last event's translation {last['translation']['text']!r} differs from {whole!r}")
print(f"{len(frames)} event(s) then [DONE], finish_reason {last['finish_reason']}, "
      f"equal to the plain answer: {streamed.strip()[:60]!r}")
PY
}
line=$(check_stream /v1/generate '{"model": "lm-shakespeare", "prompt": "ROMEO:\n", "max_tokens": 48, "seed": 1}') \
  || fail "streamed generation through the gateway"
ok "streamed generation (POST /v1/generate, lm-shakespeare): $line"
line=$(check_stream /v1/translate '{"model": "translate-de-en", "text": "Zwei Hunde spielen im Schnee.", "beam_size": 4}') \
  || fail "streamed translation through the gateway"
ok "streamed translation (POST /v1/translate, translate-de-en): $line"

# a session held in the redis service: two turns, then its record
for turn in 1 2; do
  curl -fsS --max-time 120 -H 'Content-Type: application/json' -o "$STATE/session$turn.json" \
    -d '{"model": "lm-shakespeare", "prompt": "ROMEO:", "max_tokens": 8, "seed": 1, "session": "smoke"}' \
    "$url/v1/generate" || fail "POST /v1/generate with a session (turn $turn): $(cat "$STATE/session$turn.json" 2>/dev/null | head -c 300)"
done
curl -sS --max-time 30 -o "$STATE/session.json" "$url/v1/sessions/smoke" || fail "GET /v1/sessions/smoke"
line=$("$PYTHON" -c '
import json, sys
s = json.load(open(sys.argv[1]))
# each turn is 14 tokens (6 read, 8 decoded): more than 14 means both turns went into the one session
assert s["tokens"] > 14 and s["model"] == "lm-shakespeare", s
print(s["tokens"], "tokens,", s["bytes"], "bytes")' "$STATE/session.json") \
  || fail "the session after two turns: $(head -c 300 "$STATE/session.json")"
ok "session in redis (two turns through POST /v1/generate, then GET /v1/sessions/smoke): $line"

# --- Prometheus, on the internal network only: asked from inside its container ---------------
prom() { $DC exec -T prometheus wget -qO- "http://127.0.0.1:9090/api/v1/$1"; }
t=$SECONDS
while :; do
  targets=$(prom 'targets?state=active' 2>/dev/null | "$PYTHON" -c '
import json, sys
ts = json.load(sys.stdin)["data"]["activeTargets"]
print(" ".join(sorted("%s=%s" % (t["labels"]["job"], t["health"]) for t in ts)))' 2>/dev/null || true)
  [ "$targets" = "rnnserve-gateway=up torchserve=up" ] && break
  [ $((SECONDS - t)) -lt 180 ] || fail "Prometheus targets not both up after 180 s: '${targets:-no answer}'"
  sleep 2
done
ok "Prometheus scrapes both targets: $targets (gateway:8000, torchserve:8082)"
query='sum by (model) (rnnserve_requests_total)'
t=$SECONDS
while :; do
  models=$(prom "query?query=$("$PYTHON" -c 'import sys, urllib.parse; print(urllib.parse.quote(sys.argv[1]))' "$query")" 2>/dev/null \
    | "$PYTHON" -c 'import json, sys; print(" ".join(sorted("%s=%s" % (r["metric"]["model"], r["value"][1]) for r in json.load(sys.stdin)["data"]["result"])))' 2>/dev/null || true)
  [[ "$models" == *lm-shakespeare=* && "$models" == *translate-de-en=* ]] && break
  [ $((SECONDS - t)) -lt 180 ] || fail "Prometheus query $query has no sample of both models after 180 s: '$models'"
  sleep 2
done
ok "Prometheus answers $query: $models"

# --- exposure and users --------------------------------------------------------------------------
for id in $($DC ps -q); do
  svc=$(docker inspect -f '{{index .Config.Labels "com.docker.compose.service"}}' "$id")
  bindings=$(docker inspect -f '{{range $p, $b := .HostConfig.PortBindings}}{{range $b}}{{$p}}->{{.HostIp}}:{{.HostPort}} {{end}}{{end}}' "$id")
  bindings=${bindings% }
  case "$svc" in
    gateway|grafana)
      for b in $bindings; do [[ "$b" == *"->127.0.0.1:"* ]] || fail "$svc publishes $b, not on 127.0.0.1"; done
      [ -n "$bindings" ] || fail "$svc publishes nothing" ;;
    *) [ -z "$bindings" ] || fail "$svc publishes $bindings: it must stay on the internal network" ;;
  esac
  users=$(docker top "$id" -eo pid,uid | awk 'NR > 1 {print $2}' | sort -u | tr '\n' ' ')
  [ -n "$users" ] && [[ " $users" != *" 0 "* ]] || fail "$svc runs a process as root (uids: $users)"
  ok "$svc: published ${bindings:-nothing}; processes run as uid ${users% } ($(docker top "$id" -eo pid,uid | tail -n +2 | wc -l) processes)"
done
if curl -sS -o /dev/null --max-time 2 http://127.0.0.1:8082/metrics 2>/dev/null; then
  info "(something on this host answers on 127.0.0.1:8082; not this stack: its TorchServe publishes nothing)"
fi
