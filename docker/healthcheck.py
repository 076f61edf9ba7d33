"""Container health check: exit 0 when GET /health/ready answers 200, else 1.

Standard library only, so the image needs no curl or wget. Ready means the model is loaded, warmed up
and the batcher is running; the route answers 503 until then and while shutting down.
The port is CAPSNET_PORT (8000 in the image); proxies from the environment are ignored.
"""

import os
import sys
import urllib.error
import urllib.request

url = f"http://127.0.0.1:{os.environ.get('CAPSNET_PORT', '8000')}/health/ready"
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
try:
    with opener.open(url, timeout=4) as response:
        status = response.status
except urllib.error.HTTPError as exc:
    status = exc.code
except OSError as exc:
    sys.exit(f"{url}: {exc}")
if status != 200:
    sys.exit(f"{url}: HTTP {status}")
