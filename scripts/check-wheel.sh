#!/usr/bin/env bash
# The package as a user installs it: build the sdist and the wheel (`python -m build`: the wheel is
# built from the sdist), `twine check` them, install the wheel into a fresh virtualenv outside the
# checkout, then from /tmp: `capsnet serve` on a free port answers /predict for examples/7.png with
# class 7 and serves the web page, and `capsnet predict examples/` gives every example its digit.
# So a missing package-data rule (the model, the static files) cannot ship again.
#
#   PYTHON=.venv/bin/python bash scripts/check-wheel.sh     # PYTHON needs `build` and `twine` (dev extra)
#
# Run by .ci/run and `make check-wheel`. Leaves nothing behind (a temporary folder under /tmp).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-$ROOT/.venv/bin/python}
WORK=$(mktemp -d /tmp/capsnet-wheel.XXXXXX)
SERVER_PID=
cleanup() {
    if [[ -n $SERVER_PID ]]; then
        kill "$SERVER_PID" 2>/dev/null || true
        wait "$SERVER_PID" 2>/dev/null || true
    fi
    rm -rf "$WORK"
}
trap cleanup EXIT
fail() {
    echo "check-wheel: FAILED: $*" >&2
    if [[ -f $WORK/serve.log ]]; then tail -n 30 "$WORK/serve.log" >&2; fi
    exit 1
}

echo "check-wheel: building the sdist and the wheel"
"$PYTHON" -m build --outdir "$WORK/dist" "$ROOT" >"$WORK/build.log" 2>&1 || { tail -n 40 "$WORK/build.log" >&2; fail "python -m build"; }
"$PYTHON" -m twine check --strict "$WORK"/dist/* || fail "twine check"
wheel=$(echo "$WORK"/dist/*.whl)
echo "check-wheel: $(basename "$wheel"), $(du -k "$wheel" | cut -f1) KiB"

# A fresh virtualenv from the same interpreter, no access to the checkout's packages.
"$PYTHON" -c 'import sys; print(sys._base_executable)' >"$WORK/base-python"
"$(cat "$WORK/base-python")" -m venv "$WORK/venv"
"$WORK/venv/bin/pip" install --quiet --disable-pip-version-check "$wheel" || fail "pip install $(basename "$wheel")"
VPY=$WORK/venv/bin/python

cd /tmp  # nothing of the checkout on sys.path
# One top-level package: nothing of ours for pip to overwrite in another project's `service` or `bench`.
"$VPY" -c 'import importlib.util as u; found = [m for m in ("service", "bench", "model_export", "capsnet_models") if u.find_spec(m)]; assert not found, found; import capsnet.service.app' \
    || fail "the wheel installs a top-level module other than capsnet"
port=$("$VPY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
env -u CAPSNET_MODEL_DIR "$WORK/venv/bin/capsnet" serve --port "$port" >"$WORK/serve.log" 2>&1 &
SERVER_PID=$!

"$VPY" - "$port" "$ROOT/examples/7.png" "$SERVER_PID" <<'EOF' || fail "capsnet serve from the wheel"
import json, sys, time, urllib.request
from pathlib import Path
from urllib.error import URLError

port, image, pid = sys.argv[1], sys.argv[2], sys.argv[3]
base = f"http://127.0.0.1:{port}"
deadline = time.monotonic() + 120
while True:
    try:
        with urllib.request.urlopen(f"{base}/health/ready", timeout=5) as r:
            if r.status == 200:
                break
    except (URLError, OSError):
        pass
    stat = Path(f"/proc/{pid}/stat")
    if not stat.exists() or stat.read_text().rsplit(")", 1)[1].split()[0] == "Z":
        sys.exit("capsnet serve exited")
    if time.monotonic() > deadline:
        sys.exit("the server did not become ready in 120 s")
    time.sleep(0.25)
request = urllib.request.Request(
    f"{base}/predict", data=open(image, "rb").read(), headers={"Content-Type": "image/png"}
)
with urllib.request.urlopen(request, timeout=30) as r:
    answer = json.load(r)
item = answer["predictions"][0]
assert answer["model"]["name"] == "capsnet-mnist", answer["model"]
assert item["class_index"] == 7 and item["probability"] > 0.5, item
with urllib.request.urlopen(f"{base}/", timeout=5) as r:
    page = r.read().decode()
assert "<html" in page.lower(), page[:200]
print(f"check-wheel: capsnet serve (from /tmp): /predict of examples/7.png -> class {item['class_index']} "
      f"({item['probability']:.3f}), web page {len(page)} bytes")
EOF

env -u CAPSNET_MODEL_DIR "$WORK/venv/bin/capsnet" --log-level WARNING predict "$ROOT/examples" \
    --output "$WORK/out.csv" || fail "capsnet predict examples/"
"$VPY" - "$WORK/out.csv" <<'EOF' || fail "capsnet predict gave a wrong digit"
import csv, sys
from pathlib import Path

with open(sys.argv[1], newline="") as f:
    rows = list(csv.DictReader(f))
wrong = [r["file"] for r in rows if r["class_index"] != Path(r["file"]).stem[0]]
assert len(rows) == 13 and not wrong, (len(rows), wrong)
print(f"check-wheel: capsnet predict examples/: {len(rows)} files, every digit right")
EOF
echo "check-wheel: passed"
