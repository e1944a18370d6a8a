//! `protocols`: an account's list, and what needs SMTP in it (the keys
//! only sending uses, and a `[[relay]]` rule's account).

use crate::config::{protocols_text, AccountConfig, Protocol};

/// An account's `protocols`: at least one, none twice; without SMTP, no
/// key that only sending uses.
pub(super) fn account(key: &str, a: &AccountConfig) -> Result<(), String> {
    let Some(list) = &a.protocols else {
        return Ok(());
    };
    if list.is_empty() {
        return Err(format!(
            "{key}.protocols: list at least one of \"smtp\", \"imap\", \"pop3\" (or leave protocols out for all three)"
        ));
    }
    let twice = list
        .iter()
        .enumerate()
        .find_map(|(j, p)| list[..j].contains(p).then_some(p));
    if let Some(p) = twice {
        return Err(format!("{key}.protocols: \"{p}\" is listed twice"));
    }
    if !a.allows(Protocol::Smtp) {
        for (name, set) in [
            ("send", a.send.is_some()),
            ("allowed_senders", !a.allowed_senders.is_empty()),
            ("rewrite_sender", a.rewrite_sender),
        ] {
            if set {
                return Err(format!(
                    "{key}.{name}: only for sending mail, and protocols = {} leaves out \"smtp\"; remove it here or add \"smtp\" to protocols",
                    protocols_text(list)
                ));
            }
        }
    }
    Ok(())
}

/// A `[[relay]]` rule's account (`key` is `relay[N]`) must allow SMTP:
/// a relayed device sends mail.
pub(super) fn relay_account(key: &str, account: &AccountConfig) -> Result<(), String> {
    match account
        .protocols
        .as_deref()
        .filter(|_| !account.allows(Protocol::Smtp))
    {
        Some(list) => Err(format!(
            "{key}.account: {:?} has protocols = {}: a relayed device sends mail, so add \"smtp\" to that account's protocols or relay as another account",
            account.login,
            protocols_text(list)
        )),
        None => Ok(()),
    }
}
