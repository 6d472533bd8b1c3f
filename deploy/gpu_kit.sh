#!/usr/bin/env bash
# The whole stack on a GPU machine that has python3 and torch but no Java, no TorchServe, none of the gateway's
# packages and no network (README, "GPU"). The kit is built here, carried there in parts small enough to travel
# beside the checkout, and unpacked there under /tmp/rnnserve-kit; nothing is installed system-wide.
#
#   deploy/gpu_kit.sh build     here: .gpu-kit/part-NN (12 MB each, KIT_PART_BYTES=...) and .gpu-kit/MANIFEST
#   deploy/gpu_kit.sh add       there: keep the parts present in this checkout's .gpu-kit/ (one call or several)
#   deploy/gpu_kit.sh install   there, once every part is kept: Java 17, TorchServe and the packages under
#                               /tmp/rnnserve-kit, and rnnserve's package links in the checkout
#   . /tmp/rnnserve-kit/env.sh  there: JAVA_HOME, PATH and PYTHONPATH for `python3 -m rnnserve.cli ...`
#
# Java is a runtime made with jlink from a JDK 17 (JDK=..., default Debian's openjdk-17-jdk-headless) holding
# only the modules TorchServe uses. The packages are CPython 3.12 wheels for Linux x86-64 (KIT_PYTHON=3.12),
# TorchServe's among them without the native libraries of other platforms.
set -euo pipefail
cd "$(dirname "$0")/.."
KIT=.gpu-kit
ROOT=${KIT_ROOT:-/tmp/rnnserve-kit}
PART_BYTES=${KIT_PART_BYTES:-12000000}

# the wheels the stack needs that such a machine lacks (pyproject.toml's pins, and what they need)
PACKAGES=(torchserve==0.12.0 torch-model-archiver==0.12.0 enum-compat==0.0.3 pydantic==2.14.3 pydantic-core==2.50.4
          pydantic-settings==2.16.3 python-dotenv==1.2.4 fastapi==0.165.0 fastapi-offline==1.7.7 starlette==1.10.0
          uvicorn==0.54.0 annotated-types==0.8.0 annotated-doc==0.0.7 typing-inspection==0.4.5
          typing-extensions==4.16.0 httptools==0.9.0 redis==8.1.0 opentelemetry-api==1.45.2 anyio==4.16.0)
# java.desktop holds java.beans, which log4j needs; jdk.unsupported holds what netty reads
MODULES=java.base,java.desktop,java.logging,java.management,java.naming,java.sql,java.xml,java.scripting
MODULES+=,java.instrument,jdk.unsupported,jdk.crypto.ec,jdk.management,java.net.http,jdk.zipfs,java.security.jgss

script() {  # script PATH MODULE FUNCTION: a console script calling MODULE.FUNCTION()
  printf '#!/bin/sh\nexec python3 -c "import sys; from %s import %s; sys.exit(%s())" "$@"\n' "$2" "$3" "$3" >"$1"
  chmod +x "$1"
}

build() {
  local jdk=${JDK:-/usr/lib/jvm/java-17-openjdk-amd64} py=${KIT_PYTHON:-3.12}
  [ -d "$jdk/jmods" ] || { echo "no JDK 17 with jmods at $jdk (apt-get install openjdk-17-jdk-headless, or JDK=...)" >&2; exit 2; }
  stage=$(mktemp -d)  # global: the trap runs after this function has returned
  trap 'rm -rf "$stage"' EXIT
  "$jdk/bin/jlink" --module-path "$jdk/jmods" --add-modules "$MODULES" --strip-debug --no-header-files \
    --no-man-pages --compress=0 --output "$stage/jre"  # xz below packs it smaller than jlink's own
  local platforms=()
  for p in manylinux2014_x86_64 manylinux_2_17_x86_64 manylinux_2_28_x86_64 manylinux1_x86_64; do
    platforms+=(--platform "$p")
  done
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$py" --implementation cp \
    "${platforms[@]}" -d "$stage/wheels" "${PACKAGES[@]}"
  python3 -m pip install -q --no-deps --no-compile --only-binary=:all: --python-version "$py" --implementation cp \
    "${platforms[@]}" --target "$stage/site" "$stage"/wheels/*.whl
  rm -rf "$stage/wheels" "$stage/site/bin"  # pip's scripts name this machine's python
  # TorchServe's frontend carries native libraries for every platform; x86-64 Linux needs only its own
  local jar="$stage/site/ts/frontend/model-server.jar"
  zip -q -d "$jar" 'META-INF/native/*osx*' 'META-INF/native/*windows*' 'META-INF/native/*aarch_64*' >/dev/null
  mkdir "$stage/bin"  # the two commands the stack runs, for whichever python3 runs it there
  script "$stage/bin/torchserve" ts.model_server start
  script "$stage/bin/torch-model-archiver" model_archiver.model_packaging generate_model_archive
  rm -rf "$KIT" && mkdir -p "$KIT"
  tar -C "$stage" -cf - jre site bin | xz -T0 -6 | split -b "$PART_BYTES" -d -a 2 - "$KIT/part-"
  local parts
  parts=$(ls "$KIT"/part-* | wc -l)
  { echo "parts $parts"; echo "sha256 $(cat "$KIT"/part-* | sha256sum | cut -d' ' -f1)"; echo "python $py"; } \
    >"$KIT/MANIFEST"
  echo "$KIT: $parts parts, $(du -sh "$KIT" | cut -f1) ($(tr '\n' ' ' <"$KIT/MANIFEST"))"
}

add() {
  mkdir -p "$ROOT/parts"
  local n=0
  for f in "$KIT"/part-* "$KIT"/MANIFEST; do
    [ -e "$f" ] || continue
    cp "$f" "$ROOT/parts/" && n=$((n + 1))
  done
  echo "kept $n file(s); $ROOT/parts holds $(ls "$ROOT"/parts | tr '\n' ' ')"
}

install() {
  local manifest="$ROOT/parts/MANIFEST"
  [ -f "$manifest" ] || { echo "no MANIFEST among the kept parts: run '$0 add' in a call that carries it" >&2; exit 2; }
  local want have sum
  want=$(awk '$1 == "parts" {print $2}' "$manifest")
  have=$(ls "$ROOT"/parts/part-* 2>/dev/null | wc -l)
  [ "$have" -eq "$want" ] || { echo "$have of $want parts kept: carry the rest and run '$0 add'" >&2; exit 2; }
  sum=$(cat "$ROOT"/parts/part-* | sha256sum | cut -d' ' -f1)
  [ "$sum" = "$(awk '$1 == "sha256" {print $2}' "$manifest")" ] || { echo "the parts do not match MANIFEST's sha256" >&2; exit 2; }
  rm -rf "$ROOT/jre" "$ROOT/site" "$ROOT/bin"
  cat "$ROOT"/parts/part-* | xz -d | tar -C "$ROOT" -xf -
  for p in service training; do  # pyproject's package-dir, without installing the project
    [ -e "rnnserve/$p" ] || ln -s "../$p" "rnnserve/$p"
  done
  cat >"$ROOT/env.sh" <<EOF
export JAVA_HOME=$ROOT/jre
export PATH=$ROOT/jre/bin:$ROOT/bin:\$PATH
export PYTHONPATH=$PWD:$ROOT/site\${PYTHONPATH:+:\$PYTHONPATH}
EOF
  # shellcheck disable=SC1091
  . "$ROOT/env.sh"
  java -version 2>&1 | head -1
  python3 -c "import ts, fastapi, pydantic, uvicorn, httptools, rnnserve.service.gateway.app; print('packages: ok')"
  echo "installed under $ROOT; '. $ROOT/env.sh' before running the stack"
}

case "${1:-}" in
  build) build ;;
  add) add ;;
  install) install ;;
  *) echo "usage: $0 build|add|install" >&2; exit 2 ;;
esac
