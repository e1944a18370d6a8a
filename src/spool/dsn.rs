//! Delivery status notifications (RFC 3464): what a sender gets back when
//! a spooled message cannot be delivered, written without I/O. The human
//! part says in plain words what happened and, where the refusal is a
//! known one, what the administrator should change.

use super::queue::Envelope;
use crate::wire::message::header_section;

/// The most bytes of the original's header returned with the report.
pub const MAX_RETURNED_HEADER: usize = 64 * 1024;
/// Longest server reply quoted in a report line.
const MAX_QUOTED: usize = 900;

/// One recipient the message did not reach.
#[derive(Debug, Clone)]
pub struct Failure {
    pub recipient: String,
    /// The server's reply, or what oxbridge last saw.
    pub reply: String,
}

/// Why the message is reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Why {
    /// The server refused it for good (5xx).
    Refused,
    /// It waited longer than `[spool] max_age_h`.
    Expired,
}

/// What the report needs beyond the envelope.
pub struct Report<'a> {
    /// The name oxbridge gives itself.
    pub host: &'a str,
    /// The mailbox the report is sent from (the account's own).
    pub from: &'a str,
    /// The upstream server (`host:port`).
    pub upstream: &'a str,
    pub why: Why,
    pub failures: &'a [Failure],
    /// The administrator's fix for a known refusal.
    pub advice: Option<&'a str>,
    /// Hours the message waited.
    pub waited_h: f64,
    /// Unix seconds.
    pub now: u64,
}

/// The status code of a reply: its enhanced code (`5.2.252`), else one
/// made from its basic code.
pub fn status_of(reply: &str, why: Why) -> String {
    let mut words = reply.split_whitespace();
    let basic = words.next().unwrap_or("");
    if let Some(enhanced) = words.next() {
        let parts: Vec<&str> = enhanced.split('.').collect();
        if parts.len() == 3
            && matches!(parts[0], "2" | "4" | "5")
            && parts[1..]
                .iter()
                .all(|p| !p.is_empty() && p.len() <= 3 && p.bytes().all(|b| b.is_ascii_digit()))
        {
            return enhanced.to_string();
        }
    }
    match (why, basic.as_bytes().first()) {
        (Why::Expired, _) => "4.4.7".into(),
        (_, Some(b'5')) => "5.0.0".into(),
        _ => "4.0.0".into(),
    }
}

/// A reply as one bounded, printable line.
fn quoted(reply: &str) -> String {
    let line: String = reply
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(MAX_QUOTED)
        .collect();
    line.trim_end().to_string()
}

/// An address (or any word a device or the config supplied) as it may
/// stand in a header, a status field or a line of the report: a control
/// character, white space or one of `<>"\\` is written as `\\u{..}`, so
/// that it can neither end the line nor the address.
fn shown(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if c.is_control() || c.is_whitespace() || matches!(c, '<' | '>' | '"' | '\\') {
            out.push_str(&format!("\\u{{{:x}}}", c as u32));
        } else {
            out.push(c);
        }
    }
    out
}

/// The RFC 5322 date of Unix time `t`, in UTC.
pub fn rfc5322_date(t: u64) -> String {
    const DAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let days = (t / 86400) as i64;
    let secs = t % 86400;
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{}, {:02} {} {} {:02}:{:02}:{:02} +0000",
        DAYS[(days.rem_euclid(7)) as usize],
        day,
        MONTHS[(month - 1) as usize],
        year,
        secs / 3600,
        secs % 3600 / 60,
        secs % 60
    )
}

/// The report for `envelope`, whose message starts with `message_start`
/// (its header is returned, not its body).
pub fn report(r: &Report<'_>, envelope: &Envelope, message_start: &[u8]) -> Vec<u8> {
    let boundary = format!("{}/{}", envelope.id, r.host);
    let mut human = String::new();
    human.push_str(&format!(
        "This is the mail system at host {} (oxbridge).\r\n\r\n",
        r.host
    ));
    match r.why {
        Why::Refused => human.push_str(
            "Your message could not be delivered to the recipients below: the mail server\r\n\
             refused it, and trying again would not help.\r\n",
        ),
        Why::Expired => human.push_str(&format!(
            "Your message could not be delivered to the recipients below: it waited\r\n\
             {:.1} hours without the mail server taking it, and oxbridge has given up.\r\n",
            r.waited_h
        )),
    }
    human.push_str("\r\n");
    for f in r.failures {
        human.push_str(&format!(
            "<{}>: {}\r\n",
            shown(&f.recipient),
            quoted(&f.reply)
        ));
    }
    if let Some(advice) = r.advice {
        human.push_str("\r\nWhat to do (for the administrator): ");
        human.push_str(advice);
        human.push_str("\r\n");
    }
    human.push_str(&format!(
        "\r\nThe message was received {} from {} and has the queue id {}.\r\n",
        rfc5322_date(envelope.received_at),
        shown(&envelope.client),
        shown(&envelope.id)
    ));

    let mut status = format!(
        "Reporting-MTA: dns; {}\r\nX-Oxbridge-Queue-ID: {}\r\nArrival-Date: {}\r\n",
        shown(r.host),
        shown(&envelope.id),
        rfc5322_date(envelope.received_at)
    );
    let upstream_host = r.upstream.rsplit_once(':').map_or(r.upstream, |(h, _)| h);
    for f in r.failures {
        status.push_str(&format!(
            "\r\nFinal-Recipient: rfc822; {}\r\nAction: failed\r\nStatus: {}\r\nRemote-MTA: dns; {}\r\nDiagnostic-Code: smtp; {}\r\n",
            shown(&f.recipient),
            status_of(&f.reply, r.why),
            shown(upstream_host),
            quoted(&f.reply)
        ));
    }

    let mut out = Vec::new();
    let mut header = |name: &str, value: &str| {
        out.extend_from_slice(format!("{name}: {value}\r\n").as_bytes());
    };
    header("From", &format!("Mail Delivery System <{}>", shown(r.from)));
    header("To", &format!("<{}>", shown(&envelope.sender)));
    header("Subject", "Undelivered Mail Returned to Sender");
    header("Date", &rfc5322_date(r.now));
    header(
        "Message-ID",
        &format!("<{}.report@{}>", shown(&envelope.id), shown(r.host)),
    );
    header("Auto-Submitted", "auto-replied");
    header("MIME-Version", "1.0");
    header(
        "Content-Type",
        &format!("multipart/report; report-type=delivery-status;\r\n\tboundary=\"{boundary}\""),
    );
    out.extend_from_slice(b"\r\nThis is a MIME-encapsulated message.\r\n\r\n");
    let part = |out: &mut Vec<u8>, content_type: &str, body: &[u8]| {
        out.extend_from_slice(
            format!("--{boundary}\r\nContent-Type: {content_type}\r\n\r\n").as_bytes(),
        );
        out.extend_from_slice(body);
        if !body.ends_with(b"\r\n") {
            out.extend_from_slice(b"\r\n");
        }
    };
    part(
        &mut out,
        "text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit",
        human.as_bytes(),
    );
    part(&mut out, "message/delivery-status", status.as_bytes());
    part(
        &mut out,
        "text/rfc822-headers",
        header_section(message_start, MAX_RETURNED_HEADER),
    );
    out.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_are_rfc5322_in_utc() {
        assert_eq!(rfc5322_date(0), "Thu, 01 Jan 1970 00:00:00 +0000");
        assert_eq!(
            rfc5322_date(1_796_298_211),
            "Thu, 03 Dec 2026 11:43:31 +0000"
        );
        assert_eq!(rfc5322_date(951_782_400), "Tue, 29 Feb 2000 00:00:00 +0000");
    }

    #[test]
    fn status_codes_come_from_the_reply() {
        let s = |r, w| status_of(r, w);
        assert_eq!(s("554 5.2.252 SendAsDenied; x", Why::Refused), "5.2.252");
        assert_eq!(s("550 no such user", Why::Refused), "5.0.0");
        assert_eq!(s("451 4.3.2 throttled", Why::Expired), "4.3.2");
        assert_eq!(s("connection refused", Why::Expired), "4.4.7");
    }

    #[test]
    fn a_refusal_report_names_the_recipient_the_reply_and_the_fix() {
        let envelope = Envelope {
            id: "19ade7c3f10ab12".into(),
            account: "scanner@contoso.test".into(),
            mailbox: "scanner@contoso.test".into(),
            relay: false,
            sender: "scanner@contoso.test".into(),
            recipients: vec!["boss@contoso.test".into()],
            params: vec![],
            received_at: 1_796_298_211,
            client: "192.0.2.7".into(),
            helo: "printer".into(),
            size: 10,
            report: false,
        };
        let failures = [Failure {
            recipient: "boss@contoso.test".into(),
            reply: "554 5.2.252 SendAsDenied; not allowed\r\n".into(),
        }];
        let r = Report {
            host: "oxb.test",
            from: "scanner@contoso.test",
            upstream: "smtp.office365.com:587",
            why: Why::Refused,
            failures: &failures,
            advice: Some("grant SendAs"),
            waited_h: 0.0,
            now: 1_796_298_271,
        };
        let text = String::from_utf8(report(
            &r,
            &envelope,
            b"Subject: scan\r\nFrom: x\r\n\r\nbody\r\n",
        ))
        .unwrap();
        let want = "From: Mail Delivery System <scanner@contoso.test>\r\n\
To: <scanner@contoso.test>\r\n\
Subject: Undelivered Mail Returned to Sender\r\n\
Date: Thu, 03 Dec 2026 11:44:31 +0000\r\n\
Message-ID: <19ade7c3f10ab12.report@oxb.test>\r\n\
Auto-Submitted: auto-replied\r\n\
MIME-Version: 1.0\r\n\
Content-Type: multipart/report; report-type=delivery-status;\r\n\
\tboundary=\"19ade7c3f10ab12/oxb.test\"\r\n\
\r\n\
This is a MIME-encapsulated message.\r\n\
\r\n\
--19ade7c3f10ab12/oxb.test\r\n\
Content-Type: text/plain; charset=utf-8\r\n\
Content-Transfer-Encoding: 8bit\r\n\
\r\n\
This is the mail system at host oxb.test (oxbridge).\r\n\
\r\n\
Your message could not be delivered to the recipients below: the mail server\r\n\
refused it, and trying again would not help.\r\n\
\r\n\
<boss@contoso.test>: 554 5.2.252 SendAsDenied; not allowed\r\n\
\r\n\
What to do (for the administrator): grant SendAs\r\n\
\r\n\
The message was received Thu, 03 Dec 2026 11:43:31 +0000 from 192.0.2.7 and has the queue id 19ade7c3f10ab12.\r\n\
--19ade7c3f10ab12/oxb.test\r\n\
Content-Type: message/delivery-status\r\n\
\r\n\
Reporting-MTA: dns; oxb.test\r\n\
X-Oxbridge-Queue-ID: 19ade7c3f10ab12\r\n\
Arrival-Date: Thu, 03 Dec 2026 11:43:31 +0000\r\n\
\r\n\
Final-Recipient: rfc822; boss@contoso.test\r\n\
Action: failed\r\n\
Status: 5.2.252\r\n\
Remote-MTA: dns; smtp.office365.com\r\n\
Diagnostic-Code: smtp; 554 5.2.252 SendAsDenied; not allowed\r\n\
--19ade7c3f10ab12/oxb.test\r\n\
Content-Type: text/rfc822-headers\r\n\
\r\n\
Subject: scan\r\n\
From: x\r\n\
--19ade7c3f10ab12/oxb.test--\r\n";
        assert_eq!(text, want);
    }

    #[test]
    fn hostile_addresses_never_reach_a_header_or_field_raw() {
        let hostile = "bob@example.test\u{1}x=y@other.test\r\nBcc: <eve@evil.test>\t\0";
        let envelope = Envelope {
            id: "19ade7c3f10ab12".into(),
            account: "*@other.test".into(),
            mailbox: hostile.into(),
            relay: false,
            sender: hostile.into(),
            recipients: vec![hostile.into()],
            params: vec![],
            received_at: 1_796_298_211,
            client: "192.0.2.7\r\nX: y".into(),
            helo: "printer".into(),
            size: 10,
            report: false,
        };
        let failures = [Failure {
            recipient: hostile.into(),
            reply: "550 5.1.1 no".into(),
        }];
        let r = Report {
            host: "oxb.test",
            from: hostile,
            upstream: "smtp.office365.com:587",
            why: Why::Refused,
            failures: &failures,
            advice: None,
            waited_h: 0.0,
            now: 1_796_298_271,
        };
        let bytes = report(&r, &envelope, b"Subject: scan\r\n\r\nbody\r\n");
        let text = String::from_utf8(bytes).unwrap();
        // Every line ends in CRLF, and no line holds a control character.
        let lines: Vec<&str> = text.split_terminator("\r\n").collect();
        for line in &lines {
            assert!(
                !line.chars().any(|c| c.is_control() && c != '\t'),
                "{line:?}"
            );
        }
        assert!(!text.replace("\r\n", "").contains(['\r', '\n']));
        assert!(!lines.iter().any(|l| l.starts_with("Bcc:")), "{text}");
        assert!(!lines.iter().any(|l| l.starts_with("X: y")), "{text}");
        let from = lines.iter().find(|l| l.starts_with("From: ")).unwrap();
        assert_eq!(from.matches('<').count(), 1, "{from}");
        assert!(
            from.contains("bob@example.test\\u{1}x=y@other.test"),
            "{from}"
        );
    }
}
