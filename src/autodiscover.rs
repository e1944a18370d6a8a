//! POX Autodiscover ("Plain Old XML", the Outlook 2006 schemas) for devices
//! and clients that look their settings up: the request names an e-mail
//! address, the response describes oxbridge's own IMAP, POP3 and SMTP
//! listeners for it. Plain functions over bytes; `admin` serves them.
//!
//! The answer does not depend on the accounts: any address that is a
//! [`Mailbox`] gets the same settings, so that an unauthenticated caller
//! cannot learn which addresses are configured.

use quick_xml::escape::escape;
use quick_xml::events::Event;
use quick_xml::Reader;

use crate::config::{Protocol, TlsMode};
use crate::mailbox::Mailbox;

/// A listener as a client sees it: the port is the bound one.
#[derive(Debug, Clone, Copy)]
pub struct Endpoint {
    pub protocol: Protocol,
    pub tls: TlsMode,
    pub port: u16,
}

pub const RESPONSE_NS: &str =
    "http://schemas.microsoft.com/exchange/autodiscover/responseschema/2006";
pub const OUTLOOK_NS: &str =
    "http://schemas.microsoft.com/exchange/autodiscover/outlook/responseschema/2006a";
/// The largest request body read.
pub const MAX_REQUEST: usize = 16 * 1024;
/// The longest e-mail address accepted (RFC 5321's path limit).
const MAX_ADDRESS: usize = 254;

/// The `EMailAddress` of a POX request, if it has one that is a [`Mailbox`].
pub fn requested_address(body: &[u8]) -> Option<Mailbox> {
    let mut reader = Reader::from_reader(body);
    let mut in_address = false;
    let mut buf = Vec::new();
    loop {
        match reader.read_event_into(&mut buf).ok()? {
            Event::Start(e) => in_address = e.local_name().as_ref() == b"EMailAddress",
            Event::Text(t) if in_address => {
                let text = t.decode().ok()?;
                let address = quick_xml::escape::unescape(&text).ok()?;
                let address = address.trim();
                if address.len() > MAX_ADDRESS {
                    return None;
                }
                return Mailbox::parse(address).ok();
            }
            Event::End(_) => in_address = false,
            Event::Eof => return None,
            _ => {}
        }
        buf.clear();
    }
}

/// The listener a client should use for `protocol`: implicit TLS first,
/// then STARTTLS, then plain.
fn best_listener(listeners: &[Endpoint], protocol: Protocol) -> Option<&Endpoint> {
    let rank = |l: &Endpoint| match l.tls {
        TlsMode::Implicit => 0,
        TlsMode::Starttls => 1,
        TlsMode::None => 2,
    };
    listeners
        .iter()
        .filter(|l| l.protocol == protocol)
        .min_by_key(|l| rank(l))
}

/// The settings response for `address`: one `Protocol` per protocol that
/// has a listener, naming `server` (as the client reached us).
pub fn settings(address: &str, server: &str, listeners: &[Endpoint]) -> String {
    let address = escape(address);
    let server = escape(server);
    let has_pop3 = listeners.iter().any(|l| l.protocol == Protocol::Pop3);
    let mut protocols = String::new();
    for (protocol, kind) in [
        (Protocol::Imap, "IMAP"),
        (Protocol::Pop3, "POP3"),
        (Protocol::Smtp, "SMTP"),
    ] {
        let Some(l) = best_listener(listeners, protocol) else {
            continue;
        };
        let (ssl, encryption) = match l.tls {
            TlsMode::Implicit => ("on", "SSL"),
            TlsMode::Starttls => ("on", "TLS"),
            TlsMode::None => ("off", "None"),
        };
        let pop_auth = if protocol == Protocol::Smtp && has_pop3 {
            "\n        <UsePOPAuth>on</UsePOPAuth>"
        } else {
            ""
        };
        protocols.push_str(&format!(
            "
      <Protocol>
        <Type>{kind}</Type>
        <Server>{server}</Server>
        <Port>{port}</Port>
        <LoginName>{address}</LoginName>
        <DomainRequired>off</DomainRequired>
        <SPA>off</SPA>
        <SSL>{ssl}</SSL>
        <Encryption>{encryption}</Encryption>
        <AuthRequired>on</AuthRequired>{pop_auth}
      </Protocol>",
            port = l.port,
        ));
    }
    format!(
        r#"<?xml version="1.0" encoding="utf-8"?>
<Autodiscover xmlns="{RESPONSE_NS}">
  <Response xmlns="{OUTLOOK_NS}">
    <User>
      <DisplayName>{address}</DisplayName>
    </User>
    <Account>
      <AccountType>email</AccountType>
      <Action>settings</Action>{protocols}
    </Account>
  </Response>
</Autodiscover>
"#
    )
}

/// A POX error response: `600` for a request it cannot read.
pub fn error(code: u16, message: &str) -> String {
    let message = escape(message);
    let time = chrono_free_time();
    format!(
        r#"<?xml version="1.0" encoding="utf-8"?>
<Autodiscover xmlns="{RESPONSE_NS}">
  <Response>
    <Error Time="{time}" Id="1">
      <ErrorCode>{code}</ErrorCode>
      <Message>{message}</Message>
      <DebugData />
    </Error>
  </Response>
</Autodiscover>
"#
    )
}

/// `HH:MM:SS.mmmmmmm` of now (UTC), the form Exchange puts in `Time`.
fn chrono_free_time() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let day = now.as_secs() % 86_400;
    format!(
        "{:02}:{:02}:{:02}.{:07}",
        day / 3600,
        day / 60 % 60,
        day % 60,
        now.subsec_nanos() / 100
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const REQUEST: &str = r#"<?xml version="1.0" encoding="utf-8"?>
<Autodiscover xmlns="http://schemas.microsoft.com/exchange/autodiscover/outlook/requestschema/2006">
  <Request>
    <EMailAddress>scanner@contoso.com</EMailAddress>
    <AcceptableResponseSchema>http://schemas.microsoft.com/exchange/autodiscover/outlook/responseschema/2006a</AcceptableResponseSchema>
  </Request>
</Autodiscover>"#;

    #[test]
    fn reads_the_address() {
        assert_eq!(
            requested_address(REQUEST.as_bytes()).as_deref(),
            Some("scanner@contoso.com")
        );
        for bad in [
            "a/b@x.test",
            "a@x.test\u{1}",
            "a b@x.test",
            "\"a\"@x.test",
            "a@b@x.test",
        ] {
            let body = format!("<a><EMailAddress>{bad}</EMailAddress></a>");
            assert_eq!(requested_address(body.as_bytes()), None, "{bad:?}");
        }
        let long = format!(
            "<a><EMailAddress>{}@x.test</EMailAddress></a>",
            "a".repeat(250)
        );
        assert_eq!(requested_address(long.as_bytes()), None);
        assert_eq!(requested_address(b"<Autodiscover/>"), None);
        assert_eq!(requested_address(b"not xml at all <<<"), None);
        assert_eq!(
            requested_address(b"<a><EMailAddress>no-at-sign</EMailAddress></a>"),
            None
        );
        assert_eq!(
            requested_address(b"<a><EMailAddress>x@y\r\nBcc: z</EMailAddress></a>"),
            None
        );
    }

    #[test]
    fn escapes_what_it_echoes() {
        let out = settings("a<b>&c@example.com", "host\"", &[]);
        assert!(out.contains("a&lt;b&gt;&amp;c@example.com"));
        assert!(!out.contains("a<b>"));
        let out = error(500, "<x>");
        assert!(out.contains("&lt;x&gt;"));
    }
}
