#!/usr/bin/env bash
# Fills wheelhouse/ with torch and every dependency of rnnserve for one image variant, so that
# `docker build --network none` installs from it alone (the Dockerfile uses it when wheels are there).
#   deploy/wheelhouse.sh cpu|cuda         (make wheelhouse VARIANT=cpu|cuda)
# The wheels are for CPython 3.11 on Linux x86_64, like both image bases: run it with Python 3.11.
# torch: cpu is the +cpu build (TORCH_CPU_INDEX_URL, PyTorch's CPU index, unless pip already finds it
# without an index); cuda is PyPI's build with its nvidia-* wheels (several GB).
set -euo pipefail
cd "$(dirname "$0")/.."
VARIANT=${1:-${VARIANT:-cpu}}
PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}
OUT=wheelhouse
CPU_INDEX=${TORCH_CPU_INDEX_URL:-https://download.pytorch.org/whl/cpu}

"$PYTHON" -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else "the images run Python 3.11: run this with Python 3.11 (PYTHON=...)")'
case "$VARIANT" in cpu|cuda) ;; *) echo "VARIANT must be cpu or cuda, not '$VARIANT'" >&2; exit 2 ;; esac

# the project's pins, read from pyproject.toml (one source of truth), plus what building it needs
reqs=$(mktemp)
trap 'rm -f "$reqs"' EXIT
"$PYTHON" - >"$reqs" <<'PY'
import tomllib
p = tomllib.load(open("pyproject.toml", "rb"))
# markers dropped: the wheels serve any CPython 3.11 (the image's 3.11.2 needs what this one may not)
print("\n".join(d.split(";")[0].strip() for d in p["project"]["dependencies"] if not d.startswith("torch==")))
print("\n".join(p["build-system"]["requires"] + ["wheel"]))
PY
torch_version=$(sed -n 's/^ *"torch==\([^"]*\)".*/\1/p' pyproject.toml)

mkdir -p "$OUT"
find "$OUT" -maxdepth 1 \( -name '*.whl' -o -name VARIANT \) -delete
pip=("$PYTHON" -m pip)
# `===` matches the version string exactly: 2.13.0+cpu for cpu, 2.13.0 (not +cpu) for cuda
if [ "$VARIANT" = cpu ]; then
  spec="torch===${torch_version}+cpu"
  "${pip[@]}" download -q --no-deps --no-index -d "$OUT" "$spec" 2>/dev/null \
    || "${pip[@]}" download -q --no-deps --index-url "$CPU_INDEX" -d "$OUT" "$spec"
else
  "${pip[@]}" download -q --no-deps -d "$OUT" "torch===${torch_version}"
fi
torch_wheel=$(ls "$OUT"/torch-*.whl)
# the torch file itself is the requirement, so that its dependencies (nvidia-* for cuda) come along
"${pip[@]}" wheel -q --wheel-dir "$OUT" "$torch_wheel" -r "$reqs"
echo "$VARIANT" >"$OUT/VARIANT"
echo "wheelhouse/: $(ls "$OUT"/*.whl | wc -l) wheels, $(du -sh "$OUT" | cut -f1), variant $VARIANT ($(basename "$torch_wheel"))"
