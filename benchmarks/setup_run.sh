# Sourced by the GPU run scripts after they set OUT: creates OUT and makes it absolute, enters the
# repository root, puts it on PYTHONPATH (unbuffered output) and sets PY to $PYTHON (default python3).
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
