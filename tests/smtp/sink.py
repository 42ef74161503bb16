# A mail server on loopback for tests/signin.rs (aiosmtpd, pinned in
# requirements.txt): every message it accepts is appended to FILE as one
# JSON line, its body decoded as a mail client would.
#   python3 sink.py PORT FILE
import email
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".deps"))
from aiosmtpd.controller import Controller  # noqa: E402

PORT, FILE = int(sys.argv[1]), sys.argv[2]


class Sink:
    async def handle_DATA(self, server, session, envelope):
        message = email.message_from_bytes(envelope.content)
        body = message.get_payload(decode=True).decode("utf-8", "replace")
        with open(FILE, "a") as out:
            out.write(json.dumps({
                "from": envelope.mail_from,
                "to": envelope.rcpt_tos,
                "subject": message["subject"],
                "body": body,
            }) + "\n")
        return "250 OK"


controller = Controller(Sink(), hostname="127.0.0.1", port=PORT)
controller.start()
print("ready", flush=True)
while True:
    time.sleep(3600)
