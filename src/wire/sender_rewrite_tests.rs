use super::*;

const MAILBOX: &str = "scans@contoso.com";

fn rw(header: &str) -> String {
    String::from_utf8(rewrite_header(header.as_bytes(), MAILBOX)).unwrap()
}

/// Every line of `text` ends in CRLF, and no line is a stray one a
/// reader would take for a field of its own beside the expected ones.
fn all_crlf(text: &str) {
    for (i, _) in text.match_indices('\n') {
        assert_eq!(&text[i - 1..i], "\r", "bare LF in {text:?}");
    }
}

#[test]
fn a_bare_address_becomes_the_display_name_and_the_reply_to() {
    assert_eq!(
        rw("Subject: scan\r\nFrom: scanner@printer.local\r\nTo: a@b.test\r\n\r\n"),
        "Subject: scan\r\nFrom: \"scanner@printer.local\" <scans@contoso.com>\r\nReply-To: <scanner@printer.local>\r\nTo: a@b.test\r\n\r\n"
    );
}

#[test]
fn the_devices_own_display_name_is_kept() {
    assert_eq!(
        rw("From: Scanner 3rd floor <scanner@printer.local>\r\n\r\n"),
        "From: \"Scanner 3rd floor\" <scans@contoso.com>\r\nReply-To: <scanner@printer.local>\r\n\r\n"
    );
}

#[test]
fn an_existing_reply_to_is_left_alone() {
    assert_eq!(
        rw("Reply-To: boss@x.test\r\nFrom: scanner@printer.local\r\n\r\n"),
        "Reply-To: boss@x.test\r\nFrom: \"scanner@printer.local\" <scans@contoso.com>\r\n\r\n"
    );
}

#[test]
fn no_from_at_all_gets_one_at_the_top_and_no_reply_to() {
    assert_eq!(
        rw("Subject: x\r\n\r\n"),
        "From: <scans@contoso.com>\r\nSubject: x\r\n\r\n"
    );
    assert_eq!(rw(""), "From: <scans@contoso.com>\r\n");
    assert_eq!(rw("\r\n"), "From: <scans@contoso.com>\r\n\r\n");
}

/// A folded line before any field is no field a reader agrees on (some
/// take ` From: x` for a From): it goes.
#[test]
fn a_stray_folded_line_at_the_top_is_dropped() {
    assert_eq!(
        rw(" \x01stray\r\nSubject: s\r\n\r\n"),
        "From: <scans@contoso.com>\r\nSubject: s\r\n\r\n"
    );
    assert_eq!(rw(" stray"), "From: <scans@contoso.com>\r\n");
    // One that a lenient reader takes for a From is read as the From.
    assert_eq!(
        rw(" From: \"CFO\" <cfo@contoso.com>\r\nSubject: x\r\n\r\nbody"),
        "From: \"CFO\" <scans@contoso.com>\r\nReply-To: <cfo@contoso.com>\r\nSubject: x\r\n\r\nbody"
    );
}

/// Lenient parsers read `Fr om:` and `From :` as From: so does the rewrite.
#[test]
fn a_from_with_white_space_in_its_name_is_a_from() {
    assert_eq!(
        rw("Fr om: \"CFO\" <cfo@contoso.com>\r\nSubject: x\r\n\r\n"),
        "From: \"CFO\" <scans@contoso.com>\r\nReply-To: <cfo@contoso.com>\r\nSubject: x\r\n\r\n"
    );
}

#[test]
fn every_from_and_sender_field_goes_and_only_the_first_from_counts() {
    assert_eq!(
        rw("From: first@a.test\r\nSender: s@a.test\r\nfrom : second@b.test\r\nX: y\r\n\r\n"),
        "From: \"first@a.test\" <scans@contoso.com>\r\nReply-To: <first@a.test>\r\nX: y\r\n\r\n"
    );
}

#[test]
fn a_folded_from_is_taken_whole() {
    assert_eq!(
        rw("From: \"Long\r\n Name\"\r\n\t<scanner@printer.local>\r\nSubject: s\r\n\r\n"),
        "From: \"Long Name\" <scans@contoso.com>\r\nReply-To: <scanner@printer.local>\r\nSubject: s\r\n\r\n"
    );
}

#[test]
fn quotes_and_backslashes_in_a_name_are_escaped() {
    let out = rw("From: \"a \\\"b\\\" c\\\\d\" <x@y.test>\r\n\r\n");
    assert_eq!(
        out,
        "From: \"a \\\"b\\\" c\\\\d\" <scans@contoso.com>\r\nReply-To: <x@y.test>\r\n\r\n"
    );
}

#[test]
fn control_bytes_and_nul_never_reach_the_new_from() {
    let out = rw("From: \"evil\x01\x00name\x7f\" <x@y.test>\r\n\r\n");
    assert!(
        !out.bytes().any(|b| b < 0x20 && b != b'\r' && b != b'\n'),
        "{out:?}"
    );
    assert!(!out.contains('\x7f'), "{out:?}");
    assert!(out.starts_with("From: \"evil"), "{out:?}");
    all_crlf(&out);
}

#[test]
fn an_encoded_word_that_hides_a_line_break_stays_one_field() {
    // "x\r\nBcc: victim@x.test" encoded: decoded, the CR LF are dropped.
    let hidden = base64::engine::general_purpose::STANDARD.encode("x\r\nBcc: victim@x.test");
    let out = rw(&format!(
        "From: =?UTF-8?B?{hidden}?= <x@y.test>\r\nSubject: s\r\n\r\n"
    ));
    assert_eq!(
        out,
        "From: \"x Bcc: victim@x.test\" <scans@contoso.com>\r\nReply-To: <x@y.test>\r\nSubject: s\r\n\r\n"
    );
}

#[test]
fn a_non_ascii_name_is_written_as_encoded_words() {
    let out = rw("From: =?ISO-8859-1?Q?Dr=FCcker_K=FCche?= <x@y.test>\r\n\r\n");
    assert_eq!(
        out,
        "From: =?UTF-8?B?RHLDvGNrZXIgS8O8Y2hl?= <scans@contoso.com>\r\nReply-To: <x@y.test>\r\n\r\n"
    );
    // Raw UTF-8 (SMTPUTF8) likewise; a long one is folded, every word
    // within RFC 2047's 75 characters.
    let long = "Ärger ".repeat(20);
    let out = rw(&format!("From: {long}<x@y.test>\r\n\r\n"));
    all_crlf(&out);
    let from = out.split("\r\nReply-To").next().unwrap();
    for word in from.split_whitespace().filter(|w| w.starts_with("=?")) {
        assert!(word.len() <= 75, "{word}");
    }
    assert!(from.ends_with("<scans@contoso.com>"), "{out}");
}

#[test]
fn a_group_gives_its_first_member_and_an_empty_group_none() {
    assert_eq!(
        rw("From: team: a@x.test, b@x.test;\r\n\r\n"),
        "From: \"a@x.test\" <scans@contoso.com>\r\nReply-To: <a@x.test>\r\n\r\n"
    );
    assert_eq!(
        rw("From: undisclosed:;\r\n\r\n"),
        "From: <scans@contoso.com>\r\n\r\n"
    );
}

#[test]
fn an_unusable_address_gives_no_reply_to() {
    for from in [
        "From: <a b@x.test>\r\n\r\n",
        "From: <a@b@x.test>\r\n\r\n",
        "From: not an address\r\n\r\n",
        "From: <>\r\n\r\n",
    ] {
        let out = rw(from);
        assert!(!out.contains("Reply-To"), "{from:?} -> {out:?}");
        assert!(out.contains("<scans@contoso.com>\r\n"), "{out:?}");
        all_crlf(&out);
    }
}

#[test]
fn the_mailbox_itself_is_not_its_own_reply_to() {
    assert_eq!(
        rw("From: Scans@Contoso.com\r\n\r\n"),
        "From: \"Scans@Contoso.com\" <scans@contoso.com>\r\n\r\n"
    );
}

#[test]
fn a_long_name_is_cut() {
    let out = rw(&format!("From: \"{}\" <x@y.test>\r\n\r\n", "n".repeat(500)));
    assert!(out.starts_with(&format!("From: \"{}\" <", "n".repeat(MAX_DISPLAY_CHARS))));
}

/// A header block with bare line feeds leaves with CRLF everywhere, its
/// empty line too: no server may see its end somewhere else (`\r\n\n`
/// ends it here; a server that waits for CRLF CRLF would read on, into a
/// second From).
#[test]
fn bare_lf_header_lines_leave_as_crlf() {
    assert_eq!(
        rw("Subject: s\nFrom: x@y.test\n\nbody\n"),
        "Subject: s\r\nFrom: \"x@y.test\" <scans@contoso.com>\r\nReply-To: <x@y.test>\r\n\r\nbody\n"
    );
    assert_eq!(
        rw("Subject: invoice\r\n\nFrom: \"CFO\" <cfo@contoso.com>\r\n\r\nPay\r\n"),
        "From: <scans@contoso.com>\r\nSubject: invoice\r\n\r\nFrom: \"CFO\" <cfo@contoso.com>\r\n\r\nPay\r\n"
    );
    // A lone CR is no line end to anyone here: it becomes a space.
    assert_eq!(
        rw("Subject: a\rFrom: b@c.test\r\n\r\n"),
        "From: <scans@contoso.com>\r\nSubject: a From: b@c.test\r\n\r\n"
    );
}

#[test]
fn eight_bit_fields_pass_byte_for_byte() {
    let mut header = b"Subject: \xc3\xa4 \xff raw\r\nFrom: x@y.test\r\n\r\n".to_vec();
    let out = rewrite_header(&header, MAILBOX);
    header.truncate(21);
    assert!(out.starts_with(&header), "{out:?}");
}

fn feed_all(pieces: &[&[u8]]) -> Result<Vec<u8>, TooBig> {
    let mut r = Rewriter::new(MAILBOX);
    let mut out = Vec::new();
    for p in pieces {
        r.feed(p, &mut out)?;
    }
    r.finish(&mut out);
    Ok(out)
}

#[test]
fn the_rewriter_holds_the_header_however_it_is_cut_and_passes_the_body() {
    let message = b"From: x@y.test\r\nSubject: s\r\n\r\nline\r\n\r\nFrom: not a header\r\n";
    let whole = feed_all(&[message]).unwrap();
    let expected = b"From: \"x@y.test\" <scans@contoso.com>\r\nReply-To: <x@y.test>\r\nSubject: s\r\n\r\nline\r\n\r\nFrom: not a header\r\n";
    assert_eq!(
        String::from_utf8_lossy(&whole),
        String::from_utf8_lossy(expected)
    );
    for cut in 1..message.len() {
        let (a, b) = message.split_at(cut);
        assert_eq!(feed_all(&[a, b]).unwrap(), whole, "cut at {cut}");
    }
    let bytes: Vec<&[u8]> = message.chunks(1).collect();
    assert_eq!(feed_all(&bytes).unwrap(), whole);
}

#[test]
fn a_message_with_no_body_is_rewritten_at_its_end() {
    assert_eq!(
        feed_all(&[b"Subject: s\r\nFrom: x@y.test\r\n"]).unwrap(),
        b"Subject: s\r\nFrom: \"x@y.test\" <scans@contoso.com>\r\nReply-To: <x@y.test>\r\n"
    );
    assert_eq!(
        feed_all(&[b"\r\nbody only\r\n"]).unwrap(),
        b"From: <scans@contoso.com>\r\n\r\nbody only\r\n"
    );
}

#[test]
fn a_header_block_over_the_bound_is_refused_however_it_arrives() {
    let big = format!("X: {}\r\n", "a".repeat(MAX_HEADER_BYTES));
    assert_eq!(feed_all(&[big.as_bytes()]), Err(TooBig));
    let line = "X: y\r\n".repeat(MAX_HEADER_BYTES / 6 + 1);
    let pieces: Vec<&[u8]> = line.as_bytes().chunks(1000).collect();
    assert_eq!(feed_all(&pieces), Err(TooBig));
    // Just under the bound, it is rewritten.
    let fits = format!("X: {}\r\n\r\n", "a".repeat(MAX_HEADER_BYTES - 10));
    assert!(feed_all(&[fits.as_bytes()]).is_ok());
}

/// Hostile header blocks, made of the pieces a device could send, cut
/// anywhere: the rewrite never panics, the result has exactly one From
/// field (the mailbox, one well-formed field) and at most one Reply-To
/// more than before, every line it wrote ends in CRLF, and everything
/// after the header block is untouched.
#[test]
fn hostile_headers_always_give_one_well_formed_from() {
    use rand::{Rng, SeedableRng};
    let pieces: &[&[u8]] = &[
        b"From: ",
        b"from:",
        b"FROM :",
        b"Sender: x@y\r\n",
        b"Reply-To: r@y\r\n",
        b"\"",
        b"\\",
        b"<",
        b">",
        b"a@b.test",
        b"=?UTF-8?B?QQ0KQmNjOiB4?=",
        b"=?x?Q?=0D=0A?=",
        b"grp:",
        b";",
        b",",
        b"(comment",
        b")",
        b" ",
        b"\t",
        b"\r\n",
        b"\n",
        b"\r\n ",
        b"\x00",
        b"\x01",
        b"\x7f",
        b"\xc3\xa4",
        b"\xff",
        b"X: y",
    ];
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    for _ in 0..3000 {
        let mut head = Vec::new();
        for _ in 0..rng.gen_range(0..40) {
            head.extend_from_slice(pieces[rng.gen_range(0..pieces.len())]);
        }
        let mut message = head.clone();
        message.extend_from_slice(b"\r\n\r\nBODY\x00\r\n");
        let cut = rng.gen_range(0..=message.len());
        let out = feed_all(&[&message[..cut], &message[cut..]]).unwrap();
        let end = out.len() - b"BODY\x00\r\n".len();
        assert!(out.ends_with(b"BODY\x00\r\n") || !out.windows(4).any(|w| w == b"BODY"));
        let header = &out[..end.min(out.len())];
        let (fields, _) = split_fields(header);
        let froms: Vec<&&[u8]> = fields.iter().filter(|f| named(f, b"from")).collect();
        assert_eq!(froms.len(), 1, "{:?}", String::from_utf8_lossy(&out));
        let from = froms[0];
        assert!(from.ends_with(b"<scans@contoso.com>\r\n"), "{from:?}");
        assert!(
            !from.iter().any(|&b| b < 0x20 && b != b'\r' && b != b'\n'),
            "{from:?}"
        );
        assert!(!fields.iter().any(|f| named(f, b"sender")));
    }
}
