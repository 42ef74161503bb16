"""fal's Python SDK, unmodified, pointed at AbhiAPI the way a user would:
FAL_KEY (our key), FAL_RUN_HOST and FAL_QUEUE_RUN_HOST (our host), and
SSL_CERT_FILE for the development CA. Prints one JSON line for tests/sdk.rs.

    python3 sdk.py run|subscribe
"""

import json
import sys

import fal_client
from fal_client.client import FalClientHTTPError

ARGUMENTS = {"prompt": "a red fox", "image_size": "square_hd"}

try:
    if sys.argv[1] == "run":
        result = fal_client.run("fal-ai/flux/dev", arguments=ARGUMENTS)
    else:
        result = fal_client.subscribe("fal-ai/flux/dev", arguments=ARGUMENTS, with_logs=True)
    print(json.dumps({"ok": True, "data": result}))
except FalClientHTTPError as e:
    print(json.dumps({
        "ok": False,
        "name": type(e).__name__,
        "status": e.status_code,
        "message": e.message,
        "error_type": e.error_type,
    }))
