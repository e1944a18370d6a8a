//! Microsoft's clouds (`[oauth] cloud`): each cloud's sign-in authority,
//! Exchange Online and Graph resources, and default mail hosts, in one
//! table.

use serde::Deserialize;

use super::{Protocol, DEFAULT_UPSTREAM_IMAP, DEFAULT_UPSTREAM_POP3, DEFAULT_UPSTREAM_SMTP};

/// Microsoft's clouds: each has its own sign-in authority, its own
/// Exchange Online resource (the token scopes' host) and its own mail
/// hosts.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Cloud {
    /// Microsoft 365 worldwide (and GCC, which signs in here too).
    #[default]
    Global,
    /// Microsoft 365 GCC High.
    Usgov,
    /// Microsoft 365 DoD.
    UsgovDod,
    /// Microsoft 365 operated by 21Vianet.
    China,
}

impl Cloud {
    /// Where tokens come from: `{authority}/{tenant}/oauth2/v2.0/...`.
    pub fn authority(self) -> &'static str {
        match self {
            Cloud::Global => "https://login.microsoftonline.com",
            Cloud::Usgov | Cloud::UsgovDod => "https://login.microsoftonline.us",
            Cloud::China => "https://login.partner.microsoftonline.cn",
        }
    }

    /// An endpoint of the authority: `{authority}/{tenant}/oauth2/v2.0/{name}`.
    pub fn endpoint(self, tenant: &str, name: &str) -> String {
        format!("{}/{tenant}/oauth2/v2.0/{name}", self.authority())
    }

    /// The resource of delegated scopes (`{resource}/IMAP.AccessAsUser.All`).
    pub fn delegated_resource(self) -> &'static str {
        match self {
            Cloud::Global => "https://outlook.office.com",
            _ => self.app_resource(),
        }
    }

    /// The resource of the app-only scope (`{resource}/.default`).
    pub fn app_resource(self) -> &'static str {
        match self {
            Cloud::Global => "https://outlook.office365.com",
            Cloud::Usgov => "https://outlook.office365.us",
            Cloud::UsgovDod => "https://outlook-dod.office365.us",
            Cloud::China => "https://partner.outlook.cn",
        }
    }

    /// Microsoft Graph's resource (`{resource}/.default`, `{resource}/v1.0`).
    pub fn graph_resource(self) -> &'static str {
        match self {
            Cloud::Global => "https://graph.microsoft.com",
            Cloud::Usgov => "https://graph.microsoft.us",
            Cloud::UsgovDod => "https://dod-graph.microsoft.us",
            Cloud::China => "https://microsoftgraph.chinacloudapi.cn",
        }
    }

    /// The default `[upstream]` address of `protocol`.
    pub fn upstream(self, protocol: Protocol) -> &'static str {
        match (self, protocol) {
            (Cloud::Global, Protocol::Smtp) => DEFAULT_UPSTREAM_SMTP,
            (Cloud::Global, Protocol::Imap) => DEFAULT_UPSTREAM_IMAP,
            (Cloud::Global, Protocol::Pop3) => DEFAULT_UPSTREAM_POP3,
            (Cloud::Usgov, Protocol::Smtp) => "smtp.office365.us:587",
            (Cloud::Usgov, Protocol::Imap) => "outlook.office365.us:993",
            (Cloud::Usgov, Protocol::Pop3) => "outlook.office365.us:995",
            (Cloud::UsgovDod, Protocol::Smtp) => "outlook-dod.office365.us:587",
            (Cloud::UsgovDod, Protocol::Imap) => "outlook-dod.office365.us:993",
            (Cloud::UsgovDod, Protocol::Pop3) => "outlook-dod.office365.us:995",
            (Cloud::China, Protocol::Smtp) => "smtp.partner.outlook.cn:587",
            (Cloud::China, Protocol::Imap) => "partner.outlook.cn:993",
            (Cloud::China, Protocol::Pop3) => "partner.outlook.cn:995",
        }
    }
}
