#!/usr/bin/env python3
"""IMAP device for deploy/container/test (python3 stdlib, plaintext IMAP).

  imap_client.py fetch HOST PORT LOGIN MESSAGE_ID
      Password from $DEVICE_PASSWORD. Waits up to 20 s for the message with
      this Message-ID in INBOX, prints its Subject and Message-ID header lines
      (CRLF, in that order) and then its body, exactly as the server sent them, then deletes it
      (UID STORE \\Deleted + UID EXPUNGE of that message only). Exit 1 if it
      never comes.
  imap_client.py idle HOST PORT LOGIN READY_FILE
      Logs in, selects INBOX, starts IDLE, writes READY_FILE once the server
      says "+ idling", then prints every line the server sends (repr) until
      it closes the connection, then "closed"; exit 0 then, 1 if nothing comes
      for 60 s.
"""
import imaplib
import os
import re
import socket
import sys
import time


def fetch(host: str, port: int, login: str, message_id: str) -> int:
    imap = imaplib.IMAP4(host, port, timeout=30)
    imap.login(login, os.environ["DEVICE_PASSWORD"])
    deadline = time.monotonic() + 20
    uid = None
    while time.monotonic() < deadline:
        imap.select("INBOX")
        typ, data = imap.uid("SEARCH", None, "HEADER", "Message-ID", f'"{message_id}"')
        uids = data[0].split() if typ == "OK" and data and data[0] else []
        if uids:
            uid = uids[-1].decode()
            break
        time.sleep(0.2)
    if uid is None:
        print(f"no message with Message-ID {message_id} in INBOX after 20 s", file=sys.stderr)
        return 1
    typ, data = imap.uid("FETCH", uid, "(BODY.PEEK[HEADER.FIELDS (SUBJECT MESSAGE-ID)] BODY.PEEK[TEXT])")
    if typ != "OK":
        print(f"FETCH failed: {typ} {data}", file=sys.stderr)
        return 1
    parts = {}
    for item in data:
        if isinstance(item, tuple):
            m = re.search(rb"BODY\[(HEADER\.FIELDS \([^)]*\)|TEXT)\]", item[0])
            if m:
                parts[m.group(1).split()[0].decode()] = item[1]
    header = parts.get("HEADER.FIELDS", b"").rstrip(b"\r\n")
    # Header lines in a fixed order, whatever order the message has them in.
    lines = sorted(header.split(b"\r\n"), key=lambda l: l.lower().startswith(b"message-id"))
    sys.stdout.buffer.write(b"".join(l + b"\r\n" for l in lines) + parts.get("TEXT", b""))
    imap.uid("STORE", uid, "+FLAGS.SILENT", r"(\Deleted)")
    imap.uid("EXPUNGE", uid)
    imap.logout()
    return 0


def idle(host: str, port: int, login: str, ready_file: str) -> int:
    sock = socket.create_connection((host, port), timeout=30)
    f = sock.makefile("rb")

    def until(tag: bytes) -> None:
        while True:
            line = f.readline()
            if not line:
                raise SystemExit(f"connection closed before {tag!r}")
            if line.startswith(tag):
                return

    until(b"* OK")
    password = os.environ["DEVICE_PASSWORD"]
    quoted = password.replace("\\", "\\\\").replace('"', '\\"')
    sock.sendall(f'a1 LOGIN "{login}" "{quoted}"\r\n'.encode())
    until(b"a1 OK")
    sock.sendall(b"a2 SELECT INBOX\r\n")
    until(b"a2 OK")
    sock.sendall(b"a3 IDLE\r\n")
    until(b"+")
    open(ready_file, "w").close()
    sock.settimeout(60)
    try:
        while True:
            line = f.readline()
            if not line:
                print("closed")
                return 0
            print(repr(line))
            sys.stdout.flush()
    except socket.timeout:
        print("still open 60 s after the last line", file=sys.stderr)
        return 1


def main() -> int:
    cmd, host, port, login, arg = sys.argv[1:6]
    if cmd == "fetch":
        return fetch(host, int(port), login, arg)
    if cmd == "idle":
        return idle(host, int(port), login, arg)
    raise SystemExit(f"unknown command {cmd}")


if __name__ == "__main__":
    sys.exit(main())
