#!/usr/bin/env python3
"""An upstream that refuses like Exchange Online does, for `oxbridge check`.

Speaks just enough SMTP (STARTTLS), IMAP or POP3 (implicit TLS) to accept
an XOAUTH2 login, or answer it with --reply; with --stage mail (SMTP) the
login succeeds and MAIL FROM gets --reply. Serves sessions until killed;
prints "port N" once listening. TLS with the test upstream's certificate.
"""
import argparse
import socket
import ssl
import sys
import threading

p = argparse.ArgumentParser()
p.add_argument("--protocol", choices=["smtp", "imap", "pop3"], required=True)
p.add_argument("--stage", choices=["auth", "mail"], default="auth")
p.add_argument("--reply", required=True)
p.add_argument("--cert", required=True)
p.add_argument("--key", required=True)
a = p.parse_args()

ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(a.cert, a.key)


def lines(f):
    while True:
        line = f.readline(8192)
        if not line:
            return
        yield line.rstrip(b"\r\n").decode("utf-8", "replace")


def smtp(sock):
    f = sock.makefile("rwb", buffering=0)
    f.write(b"220 fake.outlook.test ESMTP\r\n")
    tls = False
    while True:
        raw = f.readline(8192)
        if not raw:
            return
        line = raw.rstrip(b"\r\n").decode("utf-8", "replace")
        verb = line.split(" ")[0].upper()
        if verb in ("EHLO", "HELO"):
            ext = b"250-AUTH LOGIN XOAUTH2\r\n" if tls else b"250-STARTTLS\r\n"
            f.write(b"250-fake.outlook.test\r\n250-SIZE 36700160\r\n" + ext + b"250 8BITMIME\r\n")
        elif verb == "STARTTLS":
            f.write(b"220 2.0.0 SMTP server ready\r\n")
            f.close()
            sock = ctx.wrap_socket(sock, server_side=True)
            f = sock.makefile("rwb", buffering=0)
            tls = True
        elif verb == "AUTH":
            if a.stage == "auth":
                f.write(a.reply.encode() + b"\r\n")
            else:
                f.write(b"235 2.7.0 Authentication successful\r\n")
        elif verb == "MAIL":
            f.write(a.reply.encode() + b"\r\n")
        elif verb == "QUIT":
            f.write(b"221 2.0.0 Bye\r\n")
            return
        else:
            f.write(b"250 2.0.0 OK\r\n")


def imap(sock):
    sock = ctx.wrap_socket(sock, server_side=True)
    f = sock.makefile("rwb", buffering=0)
    f.write(b"* OK [CAPABILITY IMAP4rev1 SASL-IR AUTH=XOAUTH2] Fake Exchange ready.\r\n")
    for line in lines(f):
        tag, _, rest = line.partition(" ")
        cmd = rest.split(" ")[0].upper()
        if cmd == "AUTHENTICATE":
            f.write(("%s %s\r\n" % (tag, a.reply)).encode())
        elif cmd == "CAPABILITY":
            f.write(b"* CAPABILITY IMAP4rev1 SASL-IR AUTH=XOAUTH2\r\n")
            f.write(("%s OK CAPABILITY completed.\r\n" % tag).encode())
        elif cmd == "LOGOUT":
            f.write(("* BYE\r\n%s OK LOGOUT completed.\r\n" % tag).encode())
            return
        else:
            f.write(("%s BAD Command Error.\r\n" % tag).encode())


def pop3(sock):
    sock = ctx.wrap_socket(sock, server_side=True)
    f = sock.makefile("rwb", buffering=0)
    f.write(b"+OK The Microsoft Exchange POP3 service is ready.\r\n")
    for line in lines(f):
        cmd = line.split(" ")[0].upper()
        if cmd == "AUTH":
            f.write(b"+ \r\n")
            next(lines(f), None)
            f.write(a.reply.encode() + b"\r\n")
        elif cmd == "QUIT":
            f.write(b"+OK Microsoft Exchange Server POP3 server signing off.\r\n")
            return
        else:
            f.write(b"-ERR Protocol error.\r\n")


def serve(sock):
    try:
        {"smtp": smtp, "imap": imap, "pop3": pop3}[a.protocol](sock)
    except (OSError, ssl.SSLError):
        pass
    finally:
        sock.close()


server = socket.socket()
server.bind(("127.0.0.1", 0))
server.listen(16)
print("port %d" % server.getsockname()[1], flush=True)
while True:
    conn, _ = server.accept()
    conn.settimeout(30)
    threading.Thread(target=serve, args=(conn,), daemon=True).start()
