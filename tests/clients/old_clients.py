#!/usr/bin/env python3
"""What the old-client tests need beside the client itself.

  old_clients.py seed PORT CA TOKEN_URL CLIENT_ID USER PASSWORD FOLDER FILE...
      straight to the upstream's IMAPS with a token: create FOLDER, APPEND
      each FILE to it, then print the folder's messages as the upstream
      serves them (FETCH BODY.PEEK[]), one JSON line of base64 each.
  old_clients.py drop PORT CA TOKEN_URL CLIENT_ID USER PASSWORD FOLDER
      delete FOLDER again.
  old_clients.py tickets PORT CA MODE
      one TLS handshake with oxbridge (MODE implicit or starttls), one line
      read after it; prints JSON: the TLS version and whether the server
      sent a session ticket.

Every socket has a time limit; a server that does not answer is an error.
"""
import base64
import imaplib
import json
import socket
import ssl
import sys
import urllib.parse
import urllib.request

LIMIT_S = 20


def upstream(port, ca, token_url, client_id, user, password):
    body = urllib.parse.urlencode({
        "grant_type": "password", "client_id": client_id,
        "username": user, "password": password,
        "scope": "https://outlook.office.com/IMAP.AccessAsUser.All"}).encode()
    token = json.load(urllib.request.urlopen(token_url, body, timeout=LIMIT_S))["access_token"]
    imap = imaplib.IMAP4_SSL("localhost", int(port),
                             ssl_context=ssl.create_default_context(cafile=ca), timeout=LIMIT_S)
    imap.authenticate("XOAUTH2",
                      lambda _: ("user=%s\x01auth=Bearer %s\x01\x01" % (user, token)).encode())
    return imap


def check(result, what):
    typ, data = result
    if typ != "OK":
        sys.exit("%s: %s %r" % (what, typ, data))
    return data


def seed(args):
    imap = upstream(*args[:6])
    folder, files = args[6], args[7:]
    check(imap.create(folder), "CREATE")
    for path in files:
        with open(path, "rb") as f:
            check(imap.append(folder, None, None, f.read()), "APPEND")
    check(imap.select(folder, readonly=True), "SELECT")
    for part in check(imap.fetch("1:*", "(BODY.PEEK[])"), "FETCH"):
        if isinstance(part, tuple):
            print(json.dumps({"body": base64.b64encode(part[1]).decode()}))
    imap.logout()


def drop(args):
    imap = upstream(*args[:6])
    check(imap.delete(args[6]), "DELETE")
    imap.logout()


def line(sock):
    """One line from sock (at most 8 KiB), without its CRLF."""
    buf = b""
    while not buf.endswith(b"\r\n"):
        chunk = sock.recv(1)
        if not chunk:
            sys.exit("connection closed after %r" % buf)
        buf += chunk
        if len(buf) > 8192:
            sys.exit("line too long")
    return buf[:-2]


def tickets(args):
    port, ca, mode = int(args[0]), args[1], args[2]
    ctx = ssl.create_default_context(cafile=ca)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    raw = socket.create_connection(("localhost", port), timeout=LIMIT_S)
    if mode == "starttls":
        line(raw)
        raw.sendall(b"a STARTTLS\r\n")
        reply = line(raw)
        if not reply.startswith(b"a OK"):
            sys.exit("STARTTLS refused: %r" % reply)
    sock = ctx.wrap_socket(raw, server_hostname="localhost")
    if mode == "starttls":
        sock.sendall(b"b CAPABILITY\r\n")
        while not line(sock).startswith(b"b "):
            pass
    else:
        line(sock)
    session = sock.session
    print(json.dumps({"version": sock.version(),
                      "ticket": bool(session is not None and session.has_ticket)}))
    sock.close()


if __name__ == "__main__":
    {"seed": seed, "drop": drop, "tickets": tickets}[sys.argv[1]](sys.argv[2:])
