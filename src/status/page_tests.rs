use super::*;
use crate::config::Protocol;
use crate::status::board::{DeviceEntry, RefusalEntry};

const NOW: u64 = 1_800_000_000;

fn view() -> View {
    View {
        version: "9.9.9",
        host: "mail-gw".into(),
        now: NOW,
        started: NOW - 3 * 3600 - 120,
        not_ready: None,
        health: Vec::new(),
        listeners: vec![ListenerRow {
            protocol: "smtp",
            address: "0.0.0.0:587".into(),
            tls: "STARTTLS",
            delivery: Some("spool"),
            sessions: 2,
            max: 1000,
            legacy_from: Some("1.0"),
            tls_mix: vec![("TLSv1.0", 3), ("TLSv1.3", 12)],
            certificate: Some(("AB:CD:EF".into(), true)),
        }],
        accounts: vec![AccountRow {
            login: "scanner@contoso.test".into(),
            grant: "client_credentials",
            mailbox: "scans@contoso.test".into(),
            sends: "SMTP",
            provider: String::new(),
            token: TokenView {
                access_expires: Some(NOW + 3000),
                obtained: Some(NOW - 600),
                ..TokenView::default()
            },
            logins: Logins {
                last_ok: Some(NOW - 30),
                last_failure: None,
                failing: 0,
            },
            sessions: vec![("smtp", 3, 3)],
        }],
        mailboxes: vec![MailboxUse {
            protocol: Protocol::Smtp,
            mailbox: "scans@contoso.test".into(),
            sessions: 3,
            waiting: 1,
            limit: 3,
        }],
        replicas: false,
        failures: vec![Failure {
            at: NOW - 65,
            protocol: Protocol::Imap,
            peer: "192.0.2.9".parse().unwrap(),
            account: Some("<script>alert(1)</script>@x".into()),
            reason: "token_refused",
            error: "token endpoint refused: AADSTS7000215 & more".into(),
            fix: Some("Renew the client secret"),
        }],
        spool: Some(SpoolView {
            waiting: 4,
            dead: 1,
            oldest_age: Some(7200),
            rows: vec![SpoolRow {
                id: "20261203T101010-abc".into(),
                age: 7200,
                from: "scans@contoso.test".into(),
                to: "boss@contoso.test (+1)".into(),
                attempts: 5,
                last_error: "421 4.3.2 try later".into(),
            }],
        }),
        refusals: vec![RefusalEntry {
            at: NOW - 5,
            protocol: Protocol::Smtp,
            peer: "192.0.2.10".parse().unwrap(),
            name: Some("mfp-3f".into()),
            login: None,
            reason: "encryption_required",
            said: "538 5.7.11 Encryption required for requested authentication mechanism".into(),
            fix: Some("set it to use STARTTLS"),
        }],
        devices: vec![DeviceEntry {
            peer: "192.0.2.10".parse().unwrap(),
            name: Some("mfp-3f".into()),
            protocol: Protocol::Smtp,
            login: Some("scanner@contoso.test".into()),
            tls: Some("TLSv1.2"),
            last_ok: Some(NOW - 120),
            last_failure: Some((
                NOW - 5,
                "upstream_refused: 550 5.7.60 no".into(),
                Some("grant SendAs"),
            )),
        }],
        form_token: None,
    }
}

#[test]
fn the_page_refreshes_itself_fits_a_phone_and_runs_no_script() {
    let html = render(&view());
    assert!(html.starts_with("<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"));
    assert!(
        html.contains("<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">")
    );
    assert!(html.contains("<meta http-equiv=\"refresh\" content=\"10\">"));
    assert!(!html.to_lowercase().contains("<script"), "{html}");
    assert!(html.contains("<title>oxbridge on mail-gw</title>"));
    assert!(html.contains("version 9.9.9 · up 3h 2m"));
    assert!(html.contains("<span class=\"ok\">ready</span>"));
}

#[test]
fn every_section_says_what_it_holds() {
    let html = render(&view());
    for fragment in [
        "<td data-label=\"protocol\">smtp</td><td data-label=\"address\"><code>0.0.0.0:587</code></td><td data-label=\"TLS\">STARTTLS <span class=\"warn\">TLS 1.0 and later</span></td><td data-label=\"delivery\">spool</td><td class=\"num\" data-label=\"sessions\">2 / 1000</td><td data-label=\"device TLS versions\">TLSv1.0: 3, TLSv1.3: 12</td><td data-label=\"certificate (SHA-256)\">self-signed <code class=\"fingerprint\">AB:CD:EF</code></td>",
        "<td data-label=\"login\"><code>scanner@contoso.test</code></td><td data-label=\"grant\">client_credentials</td><td data-label=\"mailbox\">scans@contoso.test</td>",
        "<span class=\"ok\">valid for 50m, obtained 10m ago</span>",
        "<span class=\"ok\">last login 30s ago</span>",
        "<span class=\"pill bad\">smtp 3/3</span>",
        "<td data-label=\"mailbox\">scans@contoso.test</td><td data-label=\"protocol\">smtp</td><td class=\"num\" data-label=\"sessions / limit\"><span class=\"bad\">3 / 3</span></td><td class=\"num\" data-label=\"devices waiting\">1</td>",
        "<td data-label=\"when\">1m ago</td><td data-label=\"protocol\">imap</td><td data-label=\"device\"><code>192.0.2.9</code></td>",
        "<span class=\"bad\">token_refused</span>: token endpoint refused: AADSTS7000215 &amp; more<br><span class=\"fix\">Fix: Renew the client secret</span>",
        "4 waiting, the oldest for 2h · <span class=\"bad\">1 dead letters</span>",
        "<td data-label=\"device\"><code>192.0.2.10</code> mfp-3f</td><td data-label=\"login\"><span class=\"unknown\">none</span></td><td data-label=\"what the device was told\"><span class=\"bad\">encryption_required</span>: <code>538 5.7.11 Encryption required for requested authentication mechanism</code><br><span class=\"fix\">Fix: set it to use STARTTLS</span></td>",
        "<td data-label=\"device\"><code>192.0.2.10</code></td><td data-label=\"name\">mfp-3f</td><td data-label=\"login\"><code>scanner@contoso.test</code></td><td data-label=\"protocol\">smtp</td><td data-label=\"TLS\">TLSv1.2</td><td data-label=\"last success\">2m ago</td><td data-label=\"last failure\">5s ago: <span class=\"bad\">upstream_refused: 550 5.7.60 no</span><br><span class=\"fix\">Fix: grant SendAs</span></td>",
        "<td data-label=\"id\"><code>20261203T101010-abc</code></td><td class=\"num\" data-label=\"age\">2h</td><td data-label=\"from\">scans@contoso.test</td><td data-label=\"to\">boss@contoso.test (+1)</td><td class=\"num\" data-label=\"tries\">5</td><td data-label=\"last error\">421 4.3.2 try later</td>",
    ] {
        assert!(html.contains(fragment), "missing {fragment}\nin {html}");
    }
}

#[test]
fn text_from_devices_and_servers_is_escaped() {
    let html = render(&view());
    assert!(html.contains("<code>&lt;script&gt;alert(1)&lt;/script&gt;@x</code>"));
}

#[test]
fn empty_sections_say_so_and_not_ready_is_marked() {
    let mut v = view();
    v.accounts.clear();
    v.mailboxes.clear();
    v.failures.clear();
    v.spool = None;
    v.not_ready = Some("token endpoint unreachable".into());
    let html = render(&v);
    assert!(html.contains("<span class=\"bad\">not ready: token endpoint unreachable</span>"));
    v.health = vec!["upstream smtp unreachable since <t>".into()];
    assert!(
        render(&v).contains("<span class=\"bad\">upstream smtp unreachable since &lt;t&gt;</span>")
    );
    assert!(html.contains("No [[account]] in the configuration."));
    assert!(html.contains("No upstream session open."));
    assert!(html.contains("None since start."));
    assert!(!html.contains("SMTP queue"));
}

#[test]
fn token_verdicts() {
    let failing = TokenView {
        access_expires: Some(NOW + 100),
        error: Some((NOW, "AADSTS700082: refresh token expired".into())),
        refresh_token: true,
        ..TokenView::default()
    };
    assert_eq!(
        failing.verdict(NOW),
        (
            Health::Bad,
            "last request failed: AADSTS700082: refresh token expired".into()
        )
    );
    let idle = TokenView {
        refresh_token: true,
        refresh_issued: Some(NOW - 40 * 86400),
        refreshed: Some(NOW - 31 * 86400),
        ..TokenView::default()
    };
    assert_eq!(
        idle.verdict(NOW),
        (
            Health::Warn,
            "refresh token unused for 31d; it ends after 90 days unused".into()
        )
    );
    let never = TokenView {
        refresh_token: true,
        ..TokenView::default()
    };
    assert_eq!(never.verdict(NOW).0, Health::Bad);
    let expired = TokenView {
        access_expires: Some(NOW - 90),
        ..TokenView::default()
    };
    assert_eq!(
        expired.verdict(NOW),
        (
            Health::Unknown,
            "expired 1m ago; renewed at the next login".into()
        )
    );
    assert_eq!(
        TokenView::default().verdict(NOW).1,
        "none yet; fetched at the first login"
    );
}

#[test]
fn spans_read_like_a_person_would_say_them() {
    for (secs, text) in [
        (0, "0s"),
        (59, "59s"),
        (61, "1m"),
        (3600, "1h"),
        (3660, "1h 1m"),
        (86400, "1d"),
        (90000, "1d 1h"),
    ] {
        assert_eq!(span(secs), text);
    }
}
