#!/usr/bin/env python3
"""POX Autodiscover as a mail client does it: POST the Outlook request
schema to /autodiscover/autodiscover.xml, then check the answer against the
documented element structure (Autodiscover > Response > Account > Protocol,
or Autodiscover > Response > Error). Prints one JSON object: the protocols
found, or the error code. Exit 0 when the structure is valid, 1 otherwise.
"""
import argparse
import json
import sys
import urllib.request
import xml.etree.ElementTree as ET

REQUEST_NS = "http://schemas.microsoft.com/exchange/autodiscover/outlook/requestschema/2006"
RESPONSE_NS = "http://schemas.microsoft.com/exchange/autodiscover/responseschema/2006"
OUTLOOK_NS = "http://schemas.microsoft.com/exchange/autodiscover/outlook/responseschema/2006a"

p = argparse.ArgumentParser()
p.add_argument("--url", required=True)
p.add_argument("--email", required=True)
p.add_argument("--host-header")
a = p.parse_args()

body = f"""<?xml version="1.0" encoding="utf-8"?>
<Autodiscover xmlns="{REQUEST_NS}">
  <Request>
    <EMailAddress>{a.email}</EMailAddress>
    <AcceptableResponseSchema>{OUTLOOK_NS}</AcceptableResponseSchema>
  </Request>
</Autodiscover>""".encode()
req = urllib.request.Request(a.url, data=body, method="POST",
                             headers={"Content-Type": "text/xml; charset=utf-8"})
if a.host_header:
    req.add_header("Host", a.host_header)
with urllib.request.urlopen(req, timeout=30) as r:
    status, ctype, xml = r.status, r.headers.get("Content-Type", ""), r.read()

problems = []


def need(cond, what):
    if not cond:
        problems.append(what)


need(status == 200, "HTTP status %s" % status)
need(ctype.startswith("text/xml"), "Content-Type %r" % ctype)
root = ET.fromstring(xml)
need(root.tag == "{%s}Autodiscover" % RESPONSE_NS, "root is %s" % root.tag)
out = {}
responses = list(root)
need(len(responses) == 1, "one Response under Autodiscover")
resp = responses[0] if responses else ET.Element("none")
error = resp.find("{%s}Error" % RESPONSE_NS)
if error is not None:
    need(resp.tag == "{%s}Response" % RESPONSE_NS, "error Response tag %s" % resp.tag)
    need(error.get("Time") is not None and error.get("Id") is not None, "Error Time/Id attributes")
    code = error.findtext("{%s}ErrorCode" % RESPONSE_NS)
    need(code is not None and code.isdigit(), "ErrorCode")
    need(error.find("{%s}Message" % RESPONSE_NS) is not None, "Message")
    out["error"] = int(code) if code and code.isdigit() else None
else:
    O = "{%s}" % OUTLOOK_NS
    need(resp.tag == O + "Response", "Response tag %s" % resp.tag)
    acct = resp.find(O + "Account")
    need(acct is not None, "Account")
    acct = acct if acct is not None else ET.Element("none")
    need(acct.findtext(O + "AccountType") == "email", "AccountType email")
    need(acct.findtext(O + "Action") == "settings", "Action settings")
    protos = {}
    for pe in acct.findall(O + "Protocol"):
        t = pe.findtext(O + "Type")
        need(t in ("IMAP", "POP3", "SMTP"), "Type %r" % t)
        need(t not in protos, "one Protocol of Type %s" % t)
        d = {c.tag[len(O):]: (c.text or "") for c in pe}
        for k in ("Server", "Port", "LoginName", "SPA", "SSL", "AuthRequired"):
            need(k in d, "%s has %s" % (t, k))
        need(d.get("Port", "").isdigit(), "%s Port numeric" % t)
        need(d.get("SPA") == "off", "%s SPA off" % t)
        need(d.get("SSL") in ("on", "off"), "%s SSL on/off" % t)
        need(d.get("AuthRequired") == "on", "%s AuthRequired on" % t)
        need(d.get("Encryption", "None") in ("None", "SSL", "TLS", "Auto"), "%s Encryption" % t)
        need(d.get("LoginName") == a.email, "%s LoginName is the request's address" % t)
        protos[t] = d
    out["protocols"] = protos
out["problems"] = problems
print(json.dumps(out))
sys.exit(1 if problems else 0)
