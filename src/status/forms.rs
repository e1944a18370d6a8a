//! The status page's forms: plain POSTs to `actions/...` (relative, so
//! that a path prefix in front of the admin endpoint keeps working), each
//! with the page's anti-forgery token. Pure functions, like the page.

use maud::{html, Markup};

/// One button's form: `fields` are hidden inputs beside the token.
fn button(action: &str, token: &str, fields: &[(&str, &str)], label: &str) -> Markup {
    html! {
        form.act method="post" action=(action) {
            input type="hidden" name="csrf" value=(token);
            @for (name, value) in fields { input type="hidden" name=(name) value=(value); }
            button type="submit" { (label) }
        }
    }
}

/// An account's actions: Connect (no refresh token yet) or Reconnect for
/// a `refresh_token` account, and Check now for every account.
pub fn account(token: &str, login: &str, refresh_token: bool, consented: bool) -> Markup {
    html! {
        @if refresh_token {
            (button("actions/connect", token, &[("account", login)], if consented { "Reconnect" } else { "Connect" }))
        }
        (button("actions/check", token, &[("account", login)], "Check now"))
    }
}

/// A queued message's actions: Retry now, Drop (its sender is not told).
pub fn message(token: &str, id: &str) -> Markup {
    html! {
        (button("actions/queue", token, &[("id", id), ("op", "retry")], "Retry"))
        (button("actions/queue", token, &[("id", id), ("op", "drop")], "Drop"))
    }
}
