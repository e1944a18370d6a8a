//! The pages an action of the status page answers with, rendered by pure
//! functions like the status page itself: what happened (with the fix,
//! when it failed) and a way back; and, for a consent without
//! `[admin] public_url`, the sign-in link with the form that takes the
//! address the browser ended on. No JavaScript, no refresh (a form being
//! filled in must not reload), every text escaped.

use maud::{html, Markup, PreEscaped, DOCTYPE};

/// How an action ended.
#[derive(Debug, Clone)]
pub struct Notice {
    pub title: String,
    pub ok: bool,
    /// What happened, one line each (`oxbridge check`'s lines for "Check now").
    pub lines: Vec<String>,
}

const STYLE: &str = "\
body{font-family:system-ui,sans-serif;margin:0 auto;padding:0 .75rem 2rem;max-width:50rem;color:#1b1b1b;background:#fafafa;line-height:1.4}\
h1{font-size:1.2rem;margin:.9rem 0 .4rem}.ok{color:#176f2c}.bad{color:#b00020}\
pre{white-space:pre-wrap;word-break:break-word;background:#fff;border:1px solid #ddd;padding:.5rem;font-size:.85rem}\
textarea{width:100%;min-height:6rem;font-size:.9rem}button{font-size:1rem;padding:.3rem .8rem;margin:.4rem 0}\
a.go{display:inline-block;font-size:1.05rem;margin:.5rem 0}";

fn page(title: &str, body: Markup) -> String {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) }
                style { (PreEscaped(STYLE)) }
            }
            body { (body) }
        }
    }
    .into_string()
}

/// The page of a finished action; `back` is the status page's address
/// relative to this one (`../`).
pub fn render(n: &Notice, back: &str) -> String {
    let class = if n.ok { "ok" } else { "bad" };
    page(
        &n.title,
        html! {
            h1 class=(class) id="result" { (n.title) }
            @if !n.lines.is_empty() { pre { @for l in &n.lines { (l) "\n" } } }
            p { a href=(back) { "Back to the status page" } }
        },
    )
}

/// A consent without `public_url`: open `url`, sign in as `mailbox`, paste
/// the address the browser ends on (under `redirect`) into the form.
pub fn consent(
    account: &str,
    mailbox: &str,
    url: &str,
    redirect: &str,
    form_token: &str,
) -> String {
    page(
        &format!("Connect {account}"),
        html! {
            h1 { "Connect " (account) }
            p { "1. Open the sign-in page and sign in as " strong { (mailbox) } ":" }
            p { a.go id="sign-in" href=(url) target="_blank" rel="noopener noreferrer" { "Sign in at the provider" } }
            p {
                "2. The browser then ends on a page under " code { (redirect) }
                " (it may show an error or stay blank: that is expected). Copy the whole address from the address bar and paste it here:"
            }
            form method="post" action="paste" {
                input type="hidden" name="csrf" value=(form_token);
                textarea name="address" required autocomplete="off" spellcheck="false" {}
                br;
                button type="submit" { "Connect" }
            }
            p { "The sign-in can be finished once, within 10 minutes. " a href="../" { "Back to the status page" } }
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_notice_escapes_and_leads_back() {
        let html = render(
            &Notice {
                title: "Check of <a@x>".into(),
                ok: false,
                lines: vec!["a@x smtp: FAILED: \"<script>\"".into()],
            },
            "../",
        );
        assert!(html.contains("Check of &lt;a@x&gt;"), "{html}");
        assert!(
            html.contains("&lt;script&gt;") && !html.contains("<script>"),
            "{html}"
        );
        assert!(html.contains("href=\"../\""));
        assert!(
            !html.contains("http-equiv=\"refresh\""),
            "a notice does not reload"
        );
    }

    #[test]
    fn the_paste_form_carries_the_form_token_and_no_refresh() {
        let html = consent(
            "erp@x.test",
            "erp@x.test",
            "https://idp.test/authorize?state=s&x=<y>",
            "https://idp.test/nativeclient",
            "100.mac",
        );
        assert!(html.contains("name=\"csrf\" value=\"100.mac\""), "{html}");
        assert!(html.contains("action=\"paste\""));
        assert!(html.contains("x=&lt;y&gt;"), "{html}");
        assert!(!html.contains("http-equiv=\"refresh\""));
    }
}
