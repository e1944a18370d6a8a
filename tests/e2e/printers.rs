//! Printers and old devices as they are documented to behave, driven
//! through oxbridge to the real upstream and read back: HELO-only
//! devices, the AUTH LOGIN prompts devices compare byte for byte, AUTH
//! PLAIN and LOGIN with and without an initial response, a bare-LF body,
//! and devices that speak only TLS 1.0 or 1.1 with RSA key exchange and
//! CBC suites (`tests/clients/oldtls.py`, swaks, `openssl s_client`), on
//! listeners with `tls_min_version` and on default ones (which refuse
//! them): the suite each device list gets, no session tickets, SSL 2/3
//! and broken or stalled handshakes, STARTTLS injection, the per-listener
//! counter and log fields. Also the self-signed certificate a listener
//! without `cert_file` makes once.
//!
//! One proxy serves many rows; rows run side by side.

use base64::Engine;

use crate::harness::*;

/// How many rows run at once (the upstream and the machine are shared).
const WORKERS: usize = 4;
/// The one suite of a TLS 1.0 printer: RSA key exchange, AES-128-CBC, SHA-1.
/// `@SECLEVEL=0`: OpenSSL 3 offers TLS 1.0/1.1 and SHA-1 suites only then.
const AES128_SHA: &str = "AES128-SHA:@SECLEVEL=0";
/// Its IANA name, which a log may use instead.
const AES128_SHA_IANA: &str = "TLS_RSA_WITH_AES_128_CBC_SHA";
/// A TLS 1.1 device's suite: RSA key exchange, AES-256-CBC, SHA-1.
const AES256_SHA: &str = "AES256-SHA:@SECLEVEL=0";
/// A client that offers CBC suites first and AEAD ones after: the server's
/// own preference decides.
const CBC_FIRST: &str = "AES128-SHA:AES256-SHA:ECDHE-RSA-AES128-SHA:ECDHE-RSA-AES128-GCM-SHA256:ECDHE-RSA-AES256-GCM-SHA384:ECDHE-RSA-CHACHA20-POLY1305:@SECLEVEL=0";

fn b64(s: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(s)
}

/// The scanner account's login (mailbox alice).
const SCANNER: &str = "scanner@example.test";

/// How a device greets the server.
#[derive(Clone, Copy, Debug)]
enum Hello {
    /// HELO only: no extensions asked for, AUTH sent anyway.
    Helo,
    Ehlo,
}

/// How a device logs in.
#[derive(Clone, Copy, Debug)]
enum Auth {
    /// `AUTH LOGIN`, then the user and the password at the two prompts.
    LoginPrompts,
    /// `AUTH LOGIN <b64 user>`, then the password at the second prompt.
    LoginInitial,
    /// `AUTH PLAIN <b64>` in one line.
    PlainInitial,
    /// `AUTH PLAIN`, an empty challenge, then the response.
    PlainEmpty,
}

/// Where TLS starts, with which version and suite the device offers.
#[derive(Clone, Copy, Debug)]
enum Via {
    Plain,
    Starttls(&'static str, &'static str),
    Implicit(&'static str, &'static str),
}

/// What the body of DATA holds.
#[derive(Clone, Copy, Debug)]
enum Body {
    /// The test message: 8-bit UTF-8, lines that start with dots; CRLF.
    Standard,
    /// A message whose body has lines ended by a bare LF.
    BareLf,
}

/// One documented device behaviour on SMTP.
struct SmtpRow {
    name: &'static str,
    /// Where the behaviour is documented.
    source: &'static str,
    via: Via,
    hello: Hello,
    auth: Auth,
    body: Body,
}

/// What a read of the dialogue must be.
#[derive(Debug)]
enum Want {
    /// These bytes exactly.
    Exact(String),
    /// One line starting with this.
    OneLine(&'static str),
    /// A reply whose last line starts with this.
    Last(&'static str),
}

impl Want {
    /// `got` is what was wanted, and every line of it ends in CRLF.
    fn check(&self, got: &str) -> bool {
        let crlf = got.split_inclusive('\n').all(|l| l.ends_with("\r\n"));
        crlf && match self {
            Want::Exact(s) => got == s,
            Want::OneLine(p) => got.starts_with(p) && got.lines().count() == 1,
            Want::Last(p) => got.lines().last().unwrap_or("").starts_with(p),
        }
    }
}

/// A dialogue by hand: steps, and what each read must be.
#[derive(Default)]
struct Dialogue {
    steps: Vec<Step>,
    wants: Vec<Want>,
}

impl Dialogue {
    fn read(&mut self, want: Want) {
        self.steps.push(Step::Reply);
        self.wants.push(want);
    }
    fn say(&mut self, line: &str, want: Want) {
        self.steps.push(Step::line(line));
        self.read(want);
    }
}

/// `message` dot-stuffed for DATA, with the final dot line.
fn stuffed(message: &[u8]) -> String {
    let text = String::from_utf8(message.to_vec()).unwrap();
    let mut out = String::new();
    for line in text.split_inclusive('\n') {
        if line.starts_with('.') {
            out.push('.');
        }
        out.push_str(line);
    }
    out + ".\r\n"
}

/// A message with lines ended by a bare LF in its body.
fn bare_lf_message(tag: &str) -> Vec<u8> {
    format!(
        "From: {ALICE}\r\nTo: {ALICE}\r\nSubject: {tag}\r\nMessage-ID: {}\r\nDate: Mon, 23 Nov 2026 10:00:00 +0000\r\n\r\nfirst line ends in a bare LF\nsecond line too\nthird line ends in CRLF\r\nlast\r\n",
        message_id(tag)
    )
    .into_bytes()
}

/// The dialogue of `row` sending `message`.
fn smtp_dialogue(row: &SmtpRow, message: &[u8]) -> Dialogue {
    let mut d = Dialogue::default();
    d.read(Want::OneLine("220 "));
    if let Via::Starttls(..) = row.via {
        d.say("EHLO printer.test", Want::Last("250 "));
        d.say("STARTTLS", Want::OneLine("220 "));
        d.steps.push(Step::Tls);
    }
    match row.hello {
        // A HELO device gets one line: it would not read a list.
        Hello::Helo => d.say("HELO printer.test", Want::OneLine("250 ")),
        Hello::Ehlo => d.say("EHLO printer.test", Want::Last("250 ")),
    }
    // The prompts of AUTH LOGIN are "Username:" and "Password:", exactly.
    let username = || Want::Exact("334 VXNlcm5hbWU6\r\n".into());
    let password = || Want::Exact("334 UGFzc3dvcmQ6\r\n".into());
    let plain = plain_ir(SCANNER, SCANNER_PASSWORD);
    match row.auth {
        Auth::LoginPrompts => {
            d.say("AUTH LOGIN", username());
            d.say(&b64(SCANNER), password());
            d.say(&b64(SCANNER_PASSWORD), Want::OneLine("235 "));
        }
        Auth::LoginInitial => {
            d.say(&format!("AUTH LOGIN {}", b64(SCANNER)), password());
            d.say(&b64(SCANNER_PASSWORD), Want::OneLine("235 "));
        }
        Auth::PlainInitial => d.say(&format!("AUTH PLAIN {plain}"), Want::OneLine("235 ")),
        Auth::PlainEmpty => {
            d.say("AUTH PLAIN", Want::Exact("334 \r\n".into()));
            d.say(&plain, Want::OneLine("235 "));
        }
    }
    d.say(&format!("MAIL FROM:<{ALICE}>"), Want::OneLine("250 "));
    d.say(&format!("RCPT TO:<{ALICE}>"), Want::OneLine("250 "));
    d.say("DATA", Want::OneLine("354 "));
    d.steps.push(Step::Send(stuffed(message)));
    d.read(Want::OneLine("250 "));
    d.say("QUIT", Want::OneLine("221 "));
    d
}

/// Drive `row` through `port`: every read as wanted, the version and
/// suite it pinned, and its message in Dovecot byte for byte (a bare-LF
/// body with every line end CRLF, as Postfix stores it).
fn run_smtp_row(row: &SmtpRow, port: u16) -> Result<(), String> {
    let tag = unique(row.name);
    let sent = match row.body {
        Body::Standard => message(ALICE, ALICE, &tag, 0),
        Body::BareLf => bare_lf_message(&tag),
    };
    let d = smtp_dialogue(row, &sent);
    let (implicit, version, cipher) = match row.via {
        Via::Plain => (false, "1.3", "DEFAULT"),
        Via::Starttls(v, c) => (false, v, c),
        Via::Implicit(v, c) => (true, v, c),
    };
    let device = OldTls {
        implicit,
        ..OldTls::pinned(port, version, cipher)
    };
    let got = device.script(&d.steps);
    if !got.ok() {
        return Err(format!("dialogue failed: {}", got.text()));
    }
    let transcript = got.transcript();
    for (i, want) in d.wants.iter().enumerate() {
        let read = transcript.get(i).map(String::as_str).unwrap_or("<missing>");
        if !want.check(read) {
            return Err(format!(
                "read {i}: want {want:?}, got {read:?}; all: {transcript:?}"
            ));
        }
    }
    if let Via::Starttls(v, c) | Via::Implicit(v, c) = row.via {
        let want_version = format!("TLSv{v}");
        let want_cipher = c.split(':').next().unwrap();
        if got.version() != want_version || got.cipher() != want_cipher {
            return Err(format!(
                "negotiated {} {}, not {want_version} {want_cipher}",
                got.version(),
                got.cipher()
            ));
        }
    }
    let expected = match row.body {
        Body::Standard => sent,
        // What arrives: every bare LF stored as CRLF.
        Body::BareLf => String::from_utf8(sent)
            .unwrap()
            .replace("\r\n", "\n")
            .replace('\n', "\r\n")
            .into_bytes(),
    };
    let delivered = read_from_dovecot(ALICE, &message_id(&tag), "30")?;
    if !(delivered.len() >= expected.len() && delivered.ends_with(&expected)) {
        return Err(format!(
            "delivered differs from what was expected; delivered:\n{:?}",
            String::from_utf8_lossy(&delivered)
        ));
    }
    Ok(())
}

/// The dialogues of documented devices, in the clear (the TLS rows are in
/// [`old_tls_devices_deliver_and_read_their_mailbox`]).
const DIALOGUES: &[SmtpRow] = &[
    SmtpRow {
        name: "helo-only-auth-login",
        // RFC 5321 4.1.1.1 (HELO must still be served); scan-to-email
        // devices that never send EHLO but log in after HELO.
        source: "RFC 5321 4.1.1.1",
        via: Via::Plain,
        hello: Hello::Helo,
        auth: Auth::LoginPrompts,
        body: Body::Standard,
    },
    SmtpRow {
        name: "auth-login-exact-prompts",
        // draft-murchison-sasl-login: the server prompts "Username:" and
        // "Password:"; some Xerox models quit on any other challenge text.
        source: "draft-murchison-sasl-login-00",
        via: Via::Plain,
        hello: Hello::Ehlo,
        auth: Auth::LoginPrompts,
        body: Body::Standard,
    },
    SmtpRow {
        name: "auth-plain-initial-response",
        // RFC 4954 4 and RFC 4616: the response on the AUTH line.
        source: "RFC 4954 4, RFC 4616",
        via: Via::Plain,
        hello: Hello::Ehlo,
        auth: Auth::PlainInitial,
        body: Body::Standard,
    },
    SmtpRow {
        name: "auth-plain-empty-challenge",
        // RFC 4954 4: without an initial response the server sends "334 "
        // with an empty challenge.
        source: "RFC 4954 4",
        via: Via::Plain,
        hello: Hello::Ehlo,
        auth: Auth::PlainEmpty,
        body: Body::Standard,
    },
    SmtpRow {
        name: "auth-login-initial-response",
        // RFC 4954 4 allows an initial response for any mechanism; devices
        // send the user name on the AUTH LOGIN line (as Outlook does).
        source: "RFC 4954 4",
        via: Via::Plain,
        hello: Hello::Ehlo,
        auth: Auth::LoginInitial,
        body: Body::Standard,
    },
    SmtpRow {
        name: "bare-lf-body",
        // RFC 5321 2.3.8 forbids bare LF, yet old devices send it in
        // bodies (from text files with Unix line ends); it arrives as CRLF.
        source: "RFC 5321 2.3.8",
        via: Via::Plain,
        hello: Hello::Ehlo,
        auth: Auth::PlainInitial,
        body: Body::BareLf,
    },
];

/// Run `rows`, each on the port `port(row)`; one failure message naming
/// every row that failed.
fn run_rows<R: Sync>(
    rows: &[R],
    name: impl Fn(&R) -> String + Sync,
    f: impl Fn(&R) -> Result<(), String> + Sync,
    proxy: &Proxy,
) {
    let results = each_at_once(rows, WORKERS, f);
    let failed: Vec<String> = rows
        .iter()
        .zip(&results)
        .filter_map(|(r, res)| res.as_ref().err().map(|e| format!("{}: {e}", name(r))))
        .collect();
    assert!(
        failed.is_empty(),
        "{} of {} rows failed:\n{}\n--- proxy log ---\n{}",
        failed.len(),
        rows.len(),
        failed.join("\n"),
        proxy.logs()
    );
}

/// The password, in every form a device sent it, is in no log line.
fn assert_no_password_in(logs: &str) {
    for form in [
        SCANNER_PASSWORD.to_string(),
        b64(SCANNER_PASSWORD),
        plain_ir(SCANNER, SCANNER_PASSWORD),
    ] {
        assert!(
            !logs.contains(&form),
            "the password reached the log as {form}"
        );
    }
}

/// Every documented dialogue reaches Postfix and the message arrives in
/// Dovecot byte for byte (the bare-LF one with its line ends made CRLF).
#[test]
fn printer_dialogues_deliver_byte_identical() {
    let proxy = Proxy::start(&config(&listener("smtp", "none", true), ""));
    run_rows(
        DIALOGUES,
        |r| format!("{} ({})", r.name, r.source),
        |r| run_smtp_row(r, proxy.port(0)),
        &proxy,
    );
    assert_no_password_in(&proxy.logs());
}

/// The six ways a device starts TLS: each protocol, STARTTLS (STLS) and implicit.
const TLS_LISTENERS: [(&str, &str); 6] = [
    ("smtp", "starttls"),
    ("smtp", "implicit"),
    ("imap", "starttls"),
    ("imap", "implicit"),
    ("pop3", "starttls"),
    ("pop3", "implicit"),
];

/// The six TLS listeners, in [`TLS_LISTENERS`]' order, with
/// `tls_min_version` = `min` (None: the default), on free loopback ports.
fn six_listeners(min: Option<&str>) -> String {
    TLS_LISTENERS
        .iter()
        .map(|(protocol, tls)| tls_listener(protocol, tls, min, 0))
        .collect::<Vec<_>>()
        .join("\n")
}

/// A device on listener `i` of [`TLS_LISTENERS`] offering TLS `min`..=`max`.
fn device(
    proxy: &Proxy,
    i: usize,
    min: &'static str,
    max: &'static str,
    ciphers: &'static str,
) -> OldTls<'static> {
    let (proto, tls) = TLS_LISTENERS[i];
    OldTls {
        port: proxy.port(i),
        min,
        max,
        ciphers,
        implicit: tls == "implicit",
        proto,
    }
}

/// What the greeting and goodbye after a good handshake must look like.
fn served(run: &TlsRun, proto: &str) -> Result<(), String> {
    let t = run.transcript();
    let last = t.last().map(String::as_str).unwrap_or("");
    let ok = match proto {
        "smtp" => last.starts_with("221 "),
        "imap" => last.contains("z OK"),
        _ => last.starts_with("+OK"),
    };
    match run.ok() && ok {
        true => Ok(()),
        false => Err(format!("not served: {}", run.text())),
    }
}

/// A listener without `tls_min_version` refuses TLS 1.0 and 1.1 at the
/// handshake, on every protocol, STARTTLS and implicit alike, and serves
/// the next device (TLS 1.2) as before.
#[test]
fn default_listeners_refuse_old_tls_and_serve_the_next_device() {
    let proxy = Proxy::start(&config(&six_listeners(None), ""));
    let cases: Vec<(usize, &'static str)> = (0..TLS_LISTENERS.len())
        .flat_map(|i| [(i, "1.0"), (i, "1.1")])
        .collect();
    run_rows(
        &cases,
        |&(i, v)| format!("{:?} TLS {v}", TLS_LISTENERS[i]),
        |&(i, v)| {
            let old = device(&proxy, i, v, v, "DEFAULT:@SECLEVEL=0").handshake();
            if !old.handshake_failed() {
                return Err(format!(
                    "TLS {v} was not refused at the handshake: {}",
                    old.text()
                ));
            }
            let (proto, tls) = TLS_LISTENERS[i];
            let starttls = (tls == "starttls").then_some(proto);
            let s_client = s_client(proxy.port(i), v, AES128_SHA, starttls);
            if s_client.status.success() || text(&s_client).contains("Protocol version") {
                return Err(format!("openssl s_client got TLS {v}: {}", text(&s_client)));
            }
            let next = device(&proxy, i, "1.2", "1.2", "DEFAULT").handshake();
            served(&next, TLS_LISTENERS[i].0)?;
            match next.version() {
                "TLSv1.2" => Ok(()),
                other => Err(format!("the next device got {other}")),
            }
        },
        &proxy,
    );
}

/// Old devices' TLS on SMTP, on the legacy listeners of [`TLS_LISTENERS`]
/// (STARTTLS: listener 0, implicit: listener 1).
const OLD_TLS_SMTP: &[SmtpRow] = &[
    SmtpRow {
        name: "tls10-starttls-aes128-sha",
        // Xerox WorkCentre firmware before 2017 speaks only TLS 1.0 on
        // STARTTLS; Exchange Online refuses it.
        source: "Xerox WorkCentre scan-to-email and Microsoft 365 (TLS 1.0 only)",
        via: Via::Starttls("1.0", AES128_SHA),
        hello: Hello::Ehlo,
        auth: Auth::LoginPrompts,
        body: Body::Standard,
    },
    SmtpRow {
        name: "tls11-implicit-aes256-sha",
        // Ricoh MP/IM series with 16S/17S controllers send scans only over
        // TLS_RSA (RSA key exchange) suites; port 465 style.
        source: "Ricoh 16S/17S controllers, TLS_RSA suites only",
        via: Via::Implicit("1.1", AES256_SHA),
        hello: Hello::Helo,
        auth: Auth::PlainInitial,
        body: Body::Standard,
    },
];

/// An old mail client reading its mailbox through oxbridge.
struct MailboxRow {
    name: &'static str,
    /// Where the behaviour is documented.
    source: &'static str,
    /// Index into [`TLS_LISTENERS`].
    listener: usize,
    version: &'static str,
    cipher: &'static str,
}

/// Windows 7's Schannel has TLS 1.1 and 1.2 off for clients unless
/// enabled: Outlook 2010 and Windows Live Mail there speak TLS 1.0.
const SCHANNEL: &str = "Windows 7 Schannel clients: TLS 1.0 unless 1.1/1.2 are enabled";

const OLD_TLS_MAILBOX: &[MailboxRow] = &[
    MailboxRow {
        name: "imap-starttls-tls10",
        source: SCHANNEL,
        listener: 2,
        version: "1.0",
        cipher: AES128_SHA,
    },
    MailboxRow {
        name: "imap-implicit-tls10",
        source: SCHANNEL,
        listener: 3,
        version: "1.0",
        cipher: AES128_SHA,
    },
    MailboxRow {
        name: "imap-implicit-tls11",
        source: "embedded IMAP clients with TLS 1.1 as their newest version",
        listener: 3,
        version: "1.1",
        cipher: AES256_SHA,
    },
    MailboxRow {
        name: "pop3-stls-tls10",
        source: SCHANNEL,
        listener: 4,
        version: "1.0",
        cipher: AES128_SHA,
    },
    MailboxRow {
        name: "pop3-implicit-tls10",
        source: SCHANNEL,
        listener: 5,
        version: "1.0",
        cipher: AES128_SHA,
    },
    MailboxRow {
        name: "pop3-implicit-tls11",
        source: "embedded POP3 clients with TLS 1.1 as their newest version",
        listener: 5,
        version: "1.1",
        cipher: AES256_SHA,
    },
];

/// The message `m`, read through oxbridge by `row`'s device, is exactly
/// what Dovecot holds.
fn run_mailbox_row(proxy: &Proxy, row: &MailboxRow, m: &Message) -> Result<(), String> {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("read.eml");
    let dev = device(proxy, row.listener, row.version, row.version, row.cipher);
    let got = dev.fetch(SCANNER, SCANNER_PASSWORD, &m.id, &out);
    if !got.ok() {
        return Err(format!("session failed: {}", got.text()));
    }
    let want_version = format!("TLSv{}", row.version);
    let want_cipher = row.cipher.split(':').next().unwrap();
    if got.version() != want_version || got.cipher() != want_cipher {
        return Err(format!(
            "negotiated {} {}, not {want_version} {want_cipher}",
            got.version(),
            got.cipher()
        ));
    }
    let held = read_from_dovecot(ALICE, &m.id, "30")?;
    let read = std::fs::read(&out).unwrap();
    if read != held {
        return Err(format!(
            "read through oxbridge ({} bytes) differs from Dovecot's ({} bytes):\n{:?}\n---\n{:?}",
            read.len(),
            held.len(),
            String::from_utf8_lossy(&read),
            String::from_utf8_lossy(&held)
        ));
    }
    assert_delivered_intact(&held, &m.bytes);
    Ok(())
}

/// TLS 1.0 and 1.1 devices with RSA key exchange and CBC suites, on a
/// listener with `tls_min_version = "1.0"`: their messages arrive byte
/// for byte, and their mailboxes read through oxbridge are exactly what
/// Dovecot holds.
#[test]
fn old_tls_devices_deliver_and_read_their_mailbox() {
    let proxy = Proxy::start(&config(&six_listeners(Some("1.0")), ""));
    run_rows(
        OLD_TLS_SMTP,
        |r| format!("{} ({})", r.name, r.source),
        |r| {
            let listener = match r.via {
                Via::Implicit(..) => 1,
                _ => 0,
            };
            run_smtp_row(r, proxy.port(listener))
        },
        &proxy,
    );

    let dir = tempfile::tempdir().unwrap();
    // swaks (Net::SSLeay) as the same devices: TLS 1.0 on STARTTLS, TLS
    // 1.1 on implicit TLS, AUTH LOGIN.
    for (listener, start, protocol, cipher) in [
        (0, "--tls", "tlsv1", "AES128-SHA"),
        (1, "--tls-on-connect", "tlsv1_1", "AES256-SHA"),
    ] {
        let m = Message::write(dir.path(), &format!("swaks-{protocol}"), ALICE, 0);
        let out = run(
            std::process::Command::new("swaks")
                .args(["--server", "127.0.0.1", "--port"])
                .arg(proxy.port(listener).to_string())
                .args(["--ehlo", "printer.test", start, "--tls-protocol", protocol])
                .args(["--tls-cipher", &format!("{cipher}:@SECLEVEL=0")])
                .args(["--auth", "LOGIN", "--auth-user", SCANNER])
                .args(["--auth-password", SCANNER_PASSWORD])
                .args(["--from", ALICE, "--to", ALICE, "--data"])
                .arg(swaks_data(&m.path)),
            CLIENT_LIMIT,
        );
        let t = text(&out);
        let version = if protocol == "tlsv1" {
            "TLSv1"
        } else {
            "TLSv1.1"
        };
        assert!(
            out.status.success()
                && t.contains(&format!("TLS started with cipher {version}:{cipher}:")),
            "{t}\n{}",
            proxy.logs()
        );
        assert_arrived(ALICE, &m.id, &m.bytes);
    }

    let messages: Vec<Message> = OLD_TLS_MAILBOX
        .iter()
        .map(|r| Message::write(dir.path(), r.name, ALICE, 2000))
        .collect();
    let pairs: Vec<(&str, &std::path::Path)> =
        messages.iter().map(|m| (ALICE, m.path.as_path())).collect();
    lmtp_deliver(&pairs);
    let rows: Vec<(&MailboxRow, &Message)> = OLD_TLS_MAILBOX.iter().zip(&messages).collect();
    run_rows(
        &rows,
        |(r, _)| format!("{} ({})", r.name, r.source),
        |(r, m)| run_mailbox_row(&proxy, r, m),
        &proxy,
    );
    assert_no_password_in(&proxy.logs());
}

/// A legacy listener still prefers what modern clients offer: TLS 1.3 to
/// a TLS 1.3 client, and to a TLS 1.2 client that lists CBC suites first,
/// an ECDHE suite with AEAD (GCM or ChaCha20-Poly1305), not CBC.
#[test]
fn legacy_listeners_still_prefer_tls13_and_aead() {
    let proxy = Proxy::start(&config(&six_listeners(Some("1.0")), ""));
    let cases: Vec<(usize, &'static str)> = (0..TLS_LISTENERS.len())
        .flat_map(|i| [(i, "1.3"), (i, "1.2")])
        .collect();
    run_rows(
        &cases,
        |&(i, v)| format!("{:?} TLS {v}", TLS_LISTENERS[i]),
        |&(i, v)| {
            let (min, ciphers) = match v {
                "1.3" => ("1.3", "DEFAULT"),
                _ => ("1.0", CBC_FIRST),
            };
            let run = device(&proxy, i, min, v, ciphers).handshake();
            served(&run, TLS_LISTENERS[i].0)?;
            let cipher = run.cipher();
            let aead_ecdhe = cipher.starts_with("ECDHE-")
                && (cipher.contains("GCM") || cipher.contains("CHACHA20"));
            match (run.version(), v) {
                ("TLSv1.3", "1.3") => Ok(()),
                ("TLSv1.2", "1.2") if aead_ecdhe => Ok(()),
                (got, _) => Err(format!("negotiated {got} {cipher}")),
            }
        },
        &proxy,
    );
}

/// `(listener address, version)` -> sessions counted.
fn tls_sessions(proxy: &Proxy, listener: &str, version: &str) -> f64 {
    value(
        &scrape(proxy.admin_addr()),
        "oxbridge_device_tls_sessions_total",
        &[("listener", listener), ("version", version)],
    )
}

/// Every TLS session is counted under its listener and negotiated
/// version, and the session's log carries the version and the suite.
#[test]
fn tls_sessions_are_counted_per_listener_and_logged() {
    let proxy = Proxy::start(&config(&six_listeners(Some("1.0")), ADMIN));
    // The label is the listener's bound address.
    let addr = |i: usize| proxy.addrs[i].to_string();
    // (listener, version offered, suites, sessions)
    let sessions: [(usize, &str, &str, usize); 5] = [
        (0, "1.0", AES128_SHA, 2),
        (5, "1.1", AES256_SHA, 1),
        (5, "1.3", "DEFAULT", 1),
        (2, "1.2", "DEFAULT", 1),
        (3, "1.0", AES128_SHA, 1),
    ];
    for (i, v, ciphers, n) in sessions {
        for _ in 0..n {
            let run = device(&proxy, i, v, v, ciphers).handshake();
            assert!(run.ok(), "{}\n{}", run.text(), proxy.logs());
        }
    }
    // (listener, version, count): what was sent, and zeros beside it.
    let want = [
        (0, "TLSv1.0", 2.0),
        (0, "TLSv1.1", 0.0),
        (0, "TLSv1.2", 0.0),
        (5, "TLSv1.1", 1.0),
        (5, "TLSv1.3", 1.0),
        (5, "TLSv1.0", 0.0),
        (2, "TLSv1.2", 1.0),
        (3, "TLSv1.0", 1.0),
        (1, "TLSv1.0", 0.0),
    ];
    for (i, version, count) in want {
        assert_eq!(
            tls_sessions(&proxy, &addr(i), version),
            count,
            "listener {} {version}: {}",
            addr(i),
            curl(proxy.admin_addr(), "/metrics").1
        );
    }
    // The status page: each listener's mix of versions, legacy ones marked.
    let (status, page) = curl(proxy.admin_addr(), "/");
    assert_eq!(status, 200);
    for shown in ["TLSv1.0: 2", "TLSv1.1: 1, TLSv1.3: 1", "TLS 1.0 and later"] {
        assert!(
            page.contains(shown),
            "the status page lacks {shown:?}:\n{page}"
        );
    }
    // The session's log: the version and the suite, by OpenSSL's or IANA's name.
    let line = proxy.wait_log(&["TLSv1.0"]);
    let logs = proxy.logs();
    let named = logs
        .lines()
        .filter(|l| l.contains("TLSv1.0"))
        .find(|l| l.contains(AES128_SHA_IANA) || l.contains("AES128-SHA"));
    assert!(
        named.is_some(),
        "no TLSv1.0 line names the suite; first: {line}\n{logs}"
    );
    eprintln!("TLS session log line: {}", named.unwrap());
    assert!(logs.lines().any(|l| l.contains("TLSv1.3")), "{logs}");
}

/// The SHA-256 fingerprint in a log line: colon-separated upper-case hex
/// after `sha256=` (text logs) or in the JSON field `"sha256"`.
fn logged_fingerprint(line: &str) -> String {
    let at = ["sha256=", "\"sha256\":\""]
        .iter()
        .find_map(|key| line.find(key).map(|at| at + key.len()))
        .unwrap_or_else(|| panic!("no fingerprint in {line}"));
    line[at..]
        .chars()
        .take_while(|c| c.is_ascii_digit() || ('A'..='F').contains(c) || *c == ':')
        .collect()
}

/// The files of a directory, by name, with their bytes.
fn files(dir: &std::path::Path) -> Vec<(String, Vec<u8>)> {
    let mut all: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(Result::ok)
                .filter(|e| e.path().is_file())
                .map(|e| {
                    let name = e.file_name().to_string_lossy().into_owned();
                    (name, std::fs::read(e.path()).unwrap())
                })
                .collect()
        })
        .unwrap_or_default();
    all.sort();
    all
}

/// A TLS listener without `cert_file` makes an RSA 2048 certificate once,
/// in `state_dir/tls/` (its key readable by the owner only), logs its
/// fingerprint and shows it on the status page; a restart with the same
/// state_dir serves the same certificate; a TLS 1.0 device accepts it.
#[test]
fn self_signed_certificate_is_made_once_and_kept() {
    use std::os::unix::fs::PermissionsExt;
    let state = tempfile::tempdir().unwrap();
    let listener = self_signed_listener("smtp", "implicit", Some("1.0"), 0);
    let cfg = with_state_dir(&config(&listener, ADMIN), state.path());
    let tls_dir = state.path().join("tls");

    let mut first = Proxy::start(&cfg);
    let logged = logged_fingerprint(&first.wait_log(&["sha256"]));
    assert_eq!(logged.len(), 95, "{logged:?}\n{}", first.logs());
    let made = files(&tls_dir);
    assert!(!made.is_empty(), "no files in {}", tls_dir.display());
    for (name, bytes) in &made {
        if String::from_utf8_lossy(bytes).contains("PRIVATE KEY") {
            let mode = std::fs::metadata(tls_dir.join(name))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o077, 0, "{name} is mode {mode:o}");
        }
    }
    let old = OldTls {
        implicit: true,
        ..OldTls::pinned(first.port(0), "1.0", AES128_SHA)
    };
    let run = old.handshake();
    assert!(run.ok(), "{}\n{}", run.text(), first.logs());
    assert_eq!(run.cert_sha256(), logged);
    let der = state.path().join("served.der");
    std::fs::write(&der, run.cert_der()).unwrap();
    let x509 = text(&crate::common::run(
        std::process::Command::new("openssl")
            .args(["x509", "-inform", "DER", "-noout", "-text", "-in"])
            .arg(&der),
        CLIENT_LIMIT,
    ));
    assert!(
        x509.contains("rsaEncryption")
            && x509.contains("Public-Key: (2048 bit)")
            && x509.contains("DNS:localhost"),
        "{x509}"
    );
    let folder = std::fs::metadata(&tls_dir).unwrap().permissions().mode();
    assert_eq!(
        folder & 0o077,
        0,
        "{} is mode {folder:o}",
        tls_dir.display()
    );
    let (status, page) = curl(first.admin_addr(), "/");
    assert_eq!(status, 200);
    assert!(
        page.contains(&logged),
        "the status page lacks {logged}:\n{page}"
    );
    first.terminate();

    let second = Proxy::start(&cfg);
    assert_eq!(logged_fingerprint(&second.wait_log(&["sha256"])), logged);
    let again = OldTls {
        port: second.port(0),
        ..old
    }
    .handshake();
    assert!(again.ok(), "{}", again.text());
    assert_eq!(again.cert_sha256(), logged);
    assert_eq!(files(&tls_dir), made, "the certificate was made again");
    drop(second);

    // One of the two files lost: oxbridge does not start (a new
    // certificate would break every device that pinned this one).
    let key = made
        .iter()
        .find(|(_, bytes)| String::from_utf8_lossy(bytes).contains("PRIVATE KEY"))
        .map(|(name, _)| tls_dir.join(name))
        .expect("a key file");
    std::fs::remove_file(&key).unwrap();
    let config_file = write_config(state.path(), &cfg);
    let refused = crate::common::run(
        std::process::Command::new(env!("CARGO_BIN_EXE_oxbridge"))
            .args(["run", "--config"])
            .arg(&config_file),
        std::time::Duration::from_secs(20),
    );
    let said = text(&refused);
    assert!(!refused.status.success(), "{said}");
    assert!(said.contains(&key.display().to_string()), "{said}");
    assert!(!key.exists(), "a new key was made: {said}");
}

/// An SSL 3.0 ClientHello (record and hello version 3.0) offering
/// AES128-SHA and DES-CBC3-SHA, no extensions.
fn ssl3_client_hello() -> Vec<u8> {
    let mut hello = vec![0x03, 0x00];
    hello.extend([0x5a; 32]); // random
    hello.push(0); // no session id
    hello.extend([0x00, 0x04, 0x00, 0x2f, 0x00, 0x0a]);
    hello.extend([0x01, 0x00]); // null compression
    let mut handshake = vec![0x01, 0x00, 0x00, hello.len() as u8];
    handshake.extend(hello);
    let mut record = vec![0x16, 0x03, 0x00, 0x00, handshake.len() as u8];
    record.extend(handshake);
    record
}

/// An SSL 2.0 CLIENT-HELLO (version 0.2) offering RC4-MD5.
fn ssl2_client_hello() -> Vec<u8> {
    let mut m = vec![0x01, 0x00, 0x02, 0x00, 0x03, 0x00, 0x00, 0x00, 0x10];
    m.extend([0x01, 0x00, 0x80]);
    m.extend([0x5a; 16]); // challenge
    let mut record = vec![0x80, m.len() as u8];
    record.extend(m);
    record
}

/// A connection to listener `i` at the point where TLS starts: after
/// STARTTLS (STLS) was answered, or at once on an implicit listener.
fn at_tls_start(proxy: &Proxy, i: usize) -> Raw {
    let (proto, tls) = TLS_LISTENERS[i];
    let mut raw = Raw::connect(proxy.port(i));
    raw.writer
        .set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    if tls == "starttls" {
        let answer = match proto {
            "smtp" => {
                raw.reply();
                raw.send("EHLO attacker.test");
                raw.reply();
                raw.send("STARTTLS");
                raw.reply()
            }
            "imap" => {
                raw.line();
                raw.send("s STARTTLS");
                raw.until("s ")
            }
            _ => {
                raw.line();
                raw.send("STLS");
                raw.line()
            }
        };
        assert!(
            answer.starts_with("220 ") || answer.contains("s OK") || answer.starts_with("+OK"),
            "{answer}"
        );
    }
    raw
}

/// What the server sends back first, if anything: None when it closed.
fn first_byte(raw: &mut Raw) -> Option<u8> {
    use std::io::Read;
    let mut b = [0u8; 1];
    match raw.reader.read(&mut b) {
        Ok(1) => Some(b[0]),
        _ => None,
    }
}

/// How long a handshake may stall before oxbridge closes the connection
/// (its limit is 15 s), and how soon it may do so at the earliest.
const STALL_CLOSED_BY: std::time::Duration = std::time::Duration::from_secs(25);
const STALL_AT_LEAST: std::time::Duration = std::time::Duration::from_secs(5);

/// A device that stops half way through its hello on listener `i`: how
/// long until oxbridge closes the connection.
fn stalled_handshake(proxy: &Proxy, i: usize) -> Result<std::time::Duration, String> {
    let mut raw = at_tls_start(proxy, i);
    raw.writer.set_read_timeout(Some(STALL_CLOSED_BY)).unwrap();
    let started = std::time::Instant::now();
    raw.write(&ssl3_client_hello()[..20]);
    let first = first_byte(&mut raw);
    let waited = started.elapsed();
    match (first, waited < STALL_CLOSED_BY) {
        (Some(0x16), _) => Err("half a hello got a handshake record back".into()),
        (_, true) => Ok(waited),
        (_, false) => Err(format!("still open after {waited:?}")),
    }
}

/// A legacy listener never accepts SSL 2 or 3; a handshake cut off half
/// way, plain text where TLS was due, or a hello that stalls (closed after
/// the handshake limit) leave it serving the next device meanwhile.
#[test]
fn legacy_listeners_never_accept_ssl2_or_ssl3_and_survive_bad_handshakes() {
    let proxy = Proxy::start(&config(&six_listeners(Some("1.0")), ""));
    let cases: Vec<usize> = (0..TLS_LISTENERS.len()).collect();
    std::thread::scope(|scope| {
        // Stalled handshakes on a STARTTLS and an implicit listener, all along.
        let stalls: Vec<_> = [0, 5]
            .into_iter()
            .map(|i| {
                let proxy = &proxy;
                (i, scope.spawn(move || stalled_handshake(proxy, i)))
            })
            .collect();
        run_rows(
            &cases,
            |&i| format!("{:?}", TLS_LISTENERS[i]),
            |&i| {
                for (what, hello) in [
                    ("SSL 3.0", ssl3_client_hello()),
                    ("SSL 2.0", ssl2_client_hello()),
                ] {
                    let mut raw = at_tls_start(&proxy, i);
                    raw.write(&hello);
                    if let Some(0x16) = first_byte(&mut raw) {
                        return Err(format!("an {what} hello got a handshake record back"));
                    }
                }
                // Half a hello, then the connection is gone.
                let hello = ssl3_client_hello();
                at_tls_start(&proxy, i).write(&hello[..20]);
                // Plain text where the handshake was due.
                let mut raw = at_tls_start(&proxy, i);
                raw.write(b"EHLO printer.test\r\n\x00\x01\r\n");
                if let Some(0x16) = first_byte(&mut raw) {
                    return Err("plain text got a handshake record back".into());
                }
                let next = device(&proxy, i, "1.0", "1.0", AES128_SHA).handshake();
                served(&next, TLS_LISTENERS[i].0)?;
                // And Debian's openssl as the old device.
                let (proto, tls) = TLS_LISTENERS[i];
                let starttls = (tls == "starttls").then_some(proto);
                let s_client = text(&s_client(proxy.port(i), "1.0", AES128_SHA, starttls));
                match s_client.contains("Protocol version: TLSv1\n")
                    && s_client.contains("Ciphersuite: AES128-SHA\n")
                {
                    true => Ok(()),
                    false => Err(format!("openssl s_client -tls1: {s_client}")),
                }
            },
            &proxy,
        );
        for (i, stall) in stalls {
            let waited = stall
                .join()
                .unwrap()
                .unwrap_or_else(|e| panic!("{:?}: {e}\n{}", TLS_LISTENERS[i], proxy.logs()));
            assert!(
                waited >= STALL_AT_LEAST,
                "{:?} closed a stalled handshake after only {waited:?}",
                TLS_LISTENERS[i]
            );
        }
    });
}

/// A device's suite list on a legacy (0) or default (1) listener, and the
/// suite it must get (None: refused at the handshake).
struct SuiteRow {
    name: &'static str,
    /// Where the behaviour is documented.
    source: &'static str,
    listener: usize,
    version: &'static str,
    offered: &'static str,
    gets: Option<&'static str>,
}

const SUITES: &[SuiteRow] = &[
    SuiteRow {
        name: "ecdhe-cbc-tls10",
        source: "Windows 7 Schannel, Java 7: ECDHE with AES-CBC over TLS 1.0",
        listener: 0,
        version: "1.0",
        offered: "ECDHE-RSA-AES256-SHA:ECDHE-RSA-AES128-SHA:AES256-SHA:AES128-SHA:@SECLEVEL=0",
        gets: Some("ECDHE-RSA-AES128-SHA"),
    },
    SuiteRow {
        name: "ecdhe-cbc-tls11",
        source: "TLS 1.1 stacks of the same age",
        listener: 0,
        version: "1.1",
        offered: "ECDHE-RSA-AES128-SHA:AES128-SHA:@SECLEVEL=0",
        gets: Some("ECDHE-RSA-AES128-SHA"),
    },
    SuiteRow {
        name: "ecdhe-cbc-sha256-tls12",
        source: ".NET 4.x on Windows 7: TLS 1.2 with CBC suites first",
        listener: 0,
        version: "1.2",
        offered: "ECDHE-RSA-AES256-SHA384:ECDHE-RSA-AES128-SHA256:AES128-SHA:@SECLEVEL=0",
        gets: Some("ECDHE-RSA-AES128-SHA256"),
    },
    SuiteRow {
        name: "rsa-kx-only-tls12",
        source: "Ricoh controllers that fail against ECDHE-only servers",
        listener: 0,
        version: "1.2",
        offered: "AES256-SHA256:AES128-SHA:AES128-GCM-SHA256:@SECLEVEL=0",
        gets: Some("AES128-GCM-SHA256"),
    },
    SuiteRow {
        name: "rsa-and-dhe-tls10",
        source: "Konica Minolta bizhub manuals: RSA and DHE suites only",
        listener: 0,
        version: "1.0",
        offered: "DHE-RSA-AES256-SHA:DHE-RSA-AES128-SHA:AES256-SHA:AES128-SHA:@SECLEVEL=0",
        gets: Some("AES128-SHA"),
    },
    SuiteRow {
        name: "dhe-only",
        source: "finite-field DHE is never offered",
        listener: 0,
        version: "1.2",
        offered: "DHE-RSA-AES128-GCM-SHA256:DHE-RSA-AES128-SHA:@SECLEVEL=0",
        gets: None,
    },
    SuiteRow {
        name: "camellia-only",
        source: "suites outside the documented list are refused",
        listener: 0,
        version: "1.0",
        offered: "CAMELLIA128-SHA:CAMELLIA256-SHA:@SECLEVEL=0",
        gets: None,
    },
    SuiteRow {
        name: "cbc-only-tls12-on-a-default-listener",
        source: "default listeners: rustls, AEAD suites only",
        listener: 1,
        version: "1.2",
        offered: "ECDHE-RSA-AES128-SHA256:ECDHE-RSA-AES128-SHA:AES128-SHA:@SECLEVEL=0",
        gets: None,
    },
];

/// Each documented device suite list gets the suite the server prefers
/// among them, on a legacy listener; what is never offered is refused at
/// the handshake, and a default listener takes no CBC suite at all.
#[test]
fn legacy_listeners_serve_the_documented_suites() {
    let listeners = [
        tls_listener("smtp", "implicit", Some("1.0"), 0),
        tls_listener("smtp", "implicit", None, 0),
    ];
    let proxy = Proxy::start(&config(&listeners.join("\n"), ""));
    run_rows(
        SUITES,
        |r| format!("{} ({})", r.name, r.source),
        |r| {
            let run = OldTls {
                port: proxy.port(r.listener),
                implicit: true,
                ciphers: r.offered,
                ..OldTls::pinned(0, r.version, "")
            }
            .handshake();
            match (r.gets, run.ok()) {
                (None, _) if run.handshake_failed() => Ok(()),
                (Some(suite), true)
                    if run.cipher() == suite && run.version() == format!("TLSv{}", r.version) =>
                {
                    served(&run, "smtp")
                }
                _ => Err(format!("wanted {:?}, got: {}", r.gets, run.text())),
            }
        },
        &proxy,
    );
}

/// Devices get no TLS session tickets (some old clients lose a command
/// when one arrives right after the handshake), from default and legacy
/// listeners, at every version; a listener with `session_tickets = true`
/// sends them after a TLS 1.3 handshake.
#[test]
fn devices_get_no_session_tickets_unless_the_listener_asks() {
    let tickets = "session_tickets = true\n";
    let listeners = [
        tls_listener("smtp", "implicit", Some("1.0"), 0),
        tls_listener("imap", "starttls", None, 0),
        tls_listener("pop3", "implicit", Some("1.0"), 0) + tickets,
        tls_listener("smtp", "starttls", None, 0) + tickets,
    ];
    let proxy = Proxy::start(&config(&listeners.join("\n"), ""));
    // (listener, protocol, implicit, version, ticket wanted)
    let cases = [
        (0, "smtp", true, "1.0", false),
        (0, "smtp", true, "1.2", false),
        (0, "smtp", true, "1.3", false),
        (1, "imap", false, "1.2", false),
        (1, "imap", false, "1.3", false),
        (2, "pop3", true, "1.3", true),
        (3, "smtp", false, "1.3", true),
    ];
    run_rows(
        &cases,
        |c| format!("{c:?}"),
        |&(i, proto, implicit, version, wanted)| {
            let ciphers = match version {
                "1.0" => AES128_SHA,
                _ => "DEFAULT",
            };
            let run = OldTls {
                implicit,
                proto,
                ..OldTls::pinned(proxy.port(i), version, ciphers)
            }
            .handshake();
            served(&run, proto)?;
            match run.ticket() == wanted {
                true => Ok(()),
                false => Err(format!("ticket {}, wanted {wanted}", run.ticket())),
            }
        },
        &proxy,
    );
}

/// A command sent in the clear right behind STARTTLS (STLS), in the same
/// packet, is never answered inside TLS (command injection, RFC 3207 5):
/// on each legacy STARTTLS listener, (protocol, the injected line, the
/// first line after the handshake, what its answer starts with).
const INJECTIONS: [(usize, &str, &str, &str); 3] = [
    (0, "HELP", "NOOP", "250 "),
    (2, "x CAPABILITY", "y NOOP", "y OK"),
    (4, "NOOP", "CAPA", "+OK"),
];

#[test]
fn legacy_starttls_discards_what_was_sent_before_the_handshake() {
    let proxy = Proxy::start(&config(&six_listeners(Some("1.0")), ""));
    run_rows(
        &INJECTIONS,
        |&(i, injected, ..)| format!("{:?} with {injected:?}", TLS_LISTENERS[i]),
        |&(i, injected, after, answer)| {
            let (proto, _) = TLS_LISTENERS[i];
            let (starttls, read) = match proto {
                "smtp" => ("STARTTLS", Step::Reply),
                "imap" => ("s STARTTLS", Step::Until("s ".into())),
                _ => ("STLS", Step::Line),
            };
            let mut steps = vec![Step::Reply];
            if proto == "smtp" {
                steps.extend([Step::line("EHLO printer.test"), Step::Reply]);
            }
            steps.extend([
                Step::Send(format!("{starttls}\r\n{injected}\r\n")),
                read.clone(),
                Step::Tls,
                Step::line(after),
                match proto {
                    "imap" => Step::Until("y ".into()),
                    _ => read,
                },
            ]);
            let run = OldTls {
                proto,
                ..OldTls::pinned(proxy.port(i), "1.0", AES128_SHA)
            }
            .script(&steps);
            if !run.ok() {
                return Err(format!("failed: {}", run.text()));
            }
            // The first reply inside TLS answers the line sent inside TLS.
            let last = run.transcript().pop().unwrap_or_default();
            let lines: Vec<&str> = last.lines().collect();
            match lines.len() == 1 && lines[0].starts_with(answer) {
                true => Ok(()),
                false => Err(format!("after the handshake: {:?}", run.transcript())),
            }
        },
        &proxy,
    );
}
