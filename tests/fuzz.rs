//! Fuzz targets for every parser that sees device or upstream bytes before
//! the relay starts, with bolero. Under `cargo test` each runs a bounded
//! number of random and mutated inputs (bolero's test engine); with
//! `cargo bolero test fuzz::NAME` the same targets run coverage-guided.
//! A target fails on a panic, or on a property that does not hold.

use oxbridge::config::Config;
use oxbridge::mailbox::Mailbox;
use oxbridge::net::proxy_protocol;
use oxbridge::wire::{graph, imap, pop3, sasl, smtp};

/// Inputs per target under `cargo test`.
const ITERATIONS: usize = 200_000;

/// Seeds that real peers send; each input is a seed with random edits, or
/// the raw random bytes, so the parsers see near-valid and garbage input.
const SEEDS: &[&[u8]] = &[
    b"EHLO printer.local",
    b"AUTH PLAIN AHNjYW5uZXJAZXhhbXBsZS50ZXN0AHBhc3M=",
    b"MAIL FROM:<alice@example.test> BODY=8BITMIME SIZE=1000",
    b"BDAT 1000 LAST",
    b"250-SIZE 157286400",
    b"334 eyJzdGF0dXMiOiI0MDEiLCJzY2hlbWVzIjoiYmVhcmVyIiwic2NvcGUiOiJtYWlsIn0=",
    b"a1 LOGIN \"joe@x.test\" \"p\\\"w\"",
    b"a2 LOGIN {8}\r\njoe@x.ts {6+}\r\nsecret",
    b"a3 AUTHENTICATE PLAIN AGpvZQBzZWNyZXQ=",
    b"a4 ID (\"name\" \"x\")",
    b"* OK [CAPABILITY IMAP4rev1 SASL-IR AUTH=XOAUTH2] ready",
    b"USER scanner@example.test",
    b"PASS pass word",
    b"AUTH PLAIN",
    b"\0user@x.test\0password",
    b"authz\0user\0pw",
    b"scanner@example.test\\reception@example.test",
    b"bob@example.test\x01x=y@other.test",
    b"j\xc3\xb6s\xc3\xa9.o'brien+x@b\xc3\xbccher.example",
    b"PROXY TCP4 192.168.10.7 10.0.0.1 51000 587\r\n",
    b"PROXY TCP6 2001:db8::1 2001:db8::2 4000 25\r\n",
    b"\r\n\r\n\0\r\nQUIT\n\x21\x11\0\x0c\xc0\xa8\x0a\x07\x0a\0\0\x01\xc7\x38\x02\x4b",
    b"MIME-Version: 1.0\nContent-Type: multipart/mixed; boundary=X\n\n--X\nContent-Type: text/plain\n\nhi\r\n--X\r\nContent-Type: application/pdf; name=a.pdf\n\nPDF\n--X\nContent-Disposition: attachment; filename=b\n\nxyz\n--X--\n",
    b"[oauth]\nclient_id = \"x\"\n[[listener]]\nprotocol = \"smtp\"\nlisten = \"127.0.0.1:0\"\ntls = \"none\"\n[[account]]\nlogin = \"*@x.test\"\ngrant = \"password\"\n",
];

/// A seed edited by the random bytes: pairs of (position, value) overwrite,
/// values with the top bit set insert; an input starting with 0xff is used raw.
fn mutate(input: &[u8]) -> Vec<u8> {
    match input.split_first() {
        None => Vec::new(),
        Some((0xff, rest)) => rest.to_vec(),
        Some((pick, edits)) => {
            let mut out = SEEDS[*pick as usize % SEEDS.len()].to_vec();
            for pair in edits.chunks(2) {
                let (pos, value) = (pair[0] as usize, *pair.get(1).unwrap_or(&0));
                let at = if out.is_empty() {
                    0
                } else {
                    pos % (out.len() + 1)
                };
                if value & 0x80 != 0 || at == out.len() {
                    out.insert(at, value & 0x7f);
                } else {
                    out[at] = value;
                }
            }
            out
        }
    }
}

macro_rules! target {
    ($name:ident, |$input:ident| $body:block) => {
        #[test]
        fn $name() {
            bolero::check!()
                .with_iterations(ITERATIONS)
                .for_each(|raw: &[u8]| {
                    let mutated = mutate(raw);
                    let $input: &[u8] = &mutated;
                    $body
                });
        }
    };
}

target!(smtp_command, |input| {
    let _ = smtp::parse_command(input);
});

target!(smtp_reply_line, |input| {
    if let Some((code, _, text)) = smtp::parse_reply_line(input) {
        assert!((100..1000).contains(&code));
        assert!(text.len() < input.len());
    }
});

target!(smtp_mail_from, |input| {
    let _ = smtp::mail_sender(input);
});

target!(imap_command, |input| {
    if let Ok(cmd) = imap::parse_command(input) {
        assert!(!cmd.tag.is_empty() && !cmd.name.is_empty());
    }
    let _ = imap::literal_suffix(input);
    let _ = imap::capabilities_in(input);
});

target!(pop3_command, |input| {
    let _ = pop3::parse_command(input);
});

target!(sasl_plain, |input| {
    if let Ok(c) = sasl::decode_plain(input) {
        assert!(!c.login.is_empty());
    }
    let _ = sasl::decode_line(input);
});

target!(xoauth2_error_json, |input| {
    let _ = sasl::xoauth2_error_status(input);
});

target!(proxy_header, |input| {
    if let proxy_protocol::Parsed::Header { length, .. } = proxy_protocol::parse(input) {
        assert!(length <= input.len());
    }
    let _ = proxy_protocol::looks_like_header(input);
});

target!(config_text, |input| {
    if let Ok(text) = std::str::from_utf8(input) {
        let _ = Config::parse(text);
    }
});

target!(mailbox_parse, |input| {
    if let Ok(text) = std::str::from_utf8(input) {
        if let Ok(m) = Mailbox::parse(text) {
            assert_eq!(m.as_str(), text);
            assert_eq!(format!("{}@{}", m.local(), m.domain()), text);
            assert_eq!(text.matches('@').count(), 1);
            assert!(!m.local().is_empty() && m.local().len() <= 64);
            assert!(!m.domain().is_empty() && m.domain().len() <= 255);
            assert!(!text.contains(|c: char| c.is_control() || c.is_whitespace()));
            assert!(!text.contains(['/', '?', '#', '\\', '%', '"']));
            let token = secrecy::SecretString::from("t0ken".to_string());
            assert!(sasl::xoauth2(&m, &token).is_ok());
        }
    }
});

target!(graph_plan, |input| {
    // Every message takes the draft path: parts are cut out, never panics.
    let _ = graph::plan_within(input, 0, 1);
});

/// Inputs that were once interesting stay tests (regressions).
#[test]
fn regressions() {
    assert!(imap::parse_command(b"a LOGIN joe  two-spaces").is_err());
    assert!(imap::parse_command(b"a LOGIN {99999999999999999999}\r\n").is_err());
    assert!(imap::parse_command(b"a LOGIN {5}\r\nab").is_err());
    assert_eq!(
        proxy_protocol::parse(b"PROXY "),
        proxy_protocol::Parsed::Incomplete
    );
    assert!(sasl::decode_plain(b"\0\0").is_err());
    assert!(smtp::parse_reply_line(b"99").is_none());
    // Found by smtp_reply_line: "050" was taken as reply code 50.
    assert!(smtp::parse_reply_line(b"050 x").is_none());
    assert!(smtp::parse_reply_line(b"650 x").is_none());
}
