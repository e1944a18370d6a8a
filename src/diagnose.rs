//! What a failed login means for the administrator: Exchange Online's and
//! Entra ID's known refusals, each mapped to the setting to change and the
//! PowerShell or portal step that changes it. Used by `oxbridge check`,
//! in the log line of a device's failed login, and for the upstream's
//! refusals of a relayed SMTP session's commands ([`reply_advice`]).

use crate::error::AuthError;

/// One known refusal: a text the server or token endpoint sends, and the fix.
struct Known {
    /// Matched case-insensitively anywhere in the error's detail.
    needle: &'static str,
    fix: &'static str,
}

/// Checked in order; the first match wins (more specific needles first).
const KNOWN: &[Known] = &[
    // Exchange Online, SMTP.
    Known {
        needle: "SmtpClientAuthentication is disabled for the Tenant",
        fix: "SMTP AUTH is disabled for the whole tenant (535 5.7.139): enable it with \
              `Set-TransportConfig -SmtpClientAuthenticationDisabled $false`, or leave it off \
              and enable it only for this mailbox (`Set-CASMailbox -Identity <mailbox> \
              -SmtpClientAuthenticationDisabled $false`)",
    },
    Known {
        needle: "SmtpClientAuthentication is disabled for the Mailbox",
        fix: "SMTP AUTH is disabled for this mailbox (535 5.7.139): enable it with \
              `Set-CASMailbox -Identity <mailbox> -SmtpClientAuthenticationDisabled $false` (a \
              value of $true on the mailbox wins over the tenant's setting)",
    },
    Known {
        needle: "5.7.139",
        fix: "SMTP AUTH is disabled for the tenant or by security defaults. Enable it for the tenant \
              with `Set-TransportConfig -SmtpClientAuthenticationDisabled $false`, or for this mailbox \
              with `Set-CASMailbox -Identity <mailbox> -SmtpClientAuthenticationDisabled $false`; if \
              security defaults are on, turn them off (Entra admin center > Identity > Overview > \
              Properties > Manage security defaults) and use Conditional Access instead",
    },
    Known {
        needle: "5.7.57",
        fix: "Exchange saw no authenticated session (530 5.7.57): SMTP AUTH is off for the mailbox: \
              `Set-CASMailbox -Identity <mailbox> -SmtpClientAuthenticationDisabled $false`, and \
              check that [upstream] smtp is smtp.office365.com:587",
    },
    Known {
        needle: "5.7.30",
        fix: "Exchange refused basic authentication for client submission (550 5.7.30): the token \
              must carry SMTP permission: delegated `SMTP.Send` (grant admin consent in Entra > App \
              registrations > API permissions), or for client_credentials the application \
              permission `SMTP.SendAsApp` with admin consent",
    },
    Known {
        needle: "5.7.60",
        fix: "the mailbox may not send as the message's From address (550 5.7.60): set the \
              device's sender to the mailbox, or grant it `Add-RecipientPermission -Identity \
              <from address> -Trustee <mailbox> -AccessRights SendAs` (for a shared mailbox also \
              `Add-MailboxPermission ... -AccessRights FullAccess`)",
    },
    Known {
        needle: "5.5.105",
        fix: "a High Volume Email account sends to recipients inside the organization only \
              (550 5.5.105): send to external addresses through an ordinary mailbox (another \
              [[account]]), or keep the device's recipients internal",
    },
    Known {
        needle: "SendAsDenied",
        fix: "the mailbox may not send as the message's From address (554 5.2.252 SendAsDenied): set \
              the device's sender to the mailbox, or grant it `Add-RecipientPermission -Identity \
              <from address> -Trustee <mailbox> -AccessRights SendAs`",
    },
    Known {
        needle: "not owned by user",
        fix: "the mail server refused the envelope sender as not the mailbox's own (Postfix: \
              \"Sender address rejected: not owned by user\"): set the device's sender address \
              to the mailbox, or set rewrite_sender = true on its [[account]]",
    },
    Known {
        needle: "4.3.1",
        fix: "the mail server is short of resources for now (452 4.3.1): the device should try \
              again later; if it lasts, look the message up in the server's message trace",
    },
    // Microsoft Graph (accounts with send = "graph").
    Known {
        needle: "ErrorAccessDenied",
        fix: "Microsoft Graph refused to send for this mailbox (403 ErrorAccessDenied): give the app the \
              Microsoft Graph application permission Mail.Send with admin consent (Entra admin center > \
              App registrations > the app > API permissions > Add > Microsoft Graph > Application \
              permissions > Mail.Send > Grant admin consent), or with RBAC for Applications assign it \
              `New-ManagementRoleAssignment -App <app id> -Role \"Application Mail.Send\" \
              -CustomResourceScope <scope>` covering the mailbox",
    },
    Known {
        needle: "Invalid audience",
        fix: "Microsoft Graph refused the token as not meant for it (401 Invalid audience): the token must \
              be asked for with the scope https://graph.microsoft.com/.default; check [oauth] token_url \
              and cloud, and that [upstream] graph is the Graph of the same cloud",
    },
    Known {
        needle: "InvalidAuthenticationToken",
        fix: "Microsoft Graph refused the app's token (401): check [oauth] tenant and client_id, and that \
              the app has the Microsoft Graph application permission Mail.Send with admin consent",
    },
    Known {
        needle: "4.3.2",
        fix: "Exchange Online allows 3 concurrent SMTP connections per mailbox (432 4.3.2): keep \
              [limits] smtp_sessions_per_mailbox at 3 or below, or spread the devices over more \
              mailboxes",
    },
    Known {
        needle: "5.7.3",
        fix: "Exchange refused the token (535 5.7.3): check that the mailbox (XOAUTH2 user=) is the \
              token's user; for client_credentials, register the app in Exchange \
              (`New-ServicePrincipal -AppId <client_id> -ObjectId <enterprise app object id>`) and \
              give it the mailbox (`Add-MailboxPermission -Identity <mailbox> -User <service \
              principal id> -AccessRights FullAccess`)",
    },
    // Exchange Online, IMAP and POP3.
    Known {
        needle: "not connected",
        fix: "Exchange accepted the token but will not open the mailbox (\"User is authenticated but \
              not connected\"): IMAP or POP is disabled for it (`Set-CASMailbox -Identity <mailbox> \
              -ImapEnabled $true` or `-PopEnabled $true`), or the app lacks access to it \
              (client_credentials: `New-ServicePrincipal` and `Add-MailboxPermission ... \
              -AccessRights FullAccess`)",
    },
    Known {
        needle: "AUTHENTICATE failed",
        fix: "the IMAP server refused the token: for client_credentials, the app needs the \
              `IMAP.AccessAsApp` permission with admin consent, a service principal in Exchange \
              (`New-ServicePrincipal`) and `Add-MailboxPermission -AccessRights FullAccess` on the \
              mailbox; for delegated grants, `IMAP.AccessAsUser.All` consent and \
              `Set-CASMailbox -ImapEnabled $true`",
    },
    // Google: token endpoint, then Gmail's IMAP and POP3.
    Known {
        needle: "Client is unauthorized to retrieve access tokens",
        fix: "Google refused the service account (unauthorized_client): it has no domain-wide \
              delegation for https://mail.google.com/. In the Google Admin console > Security > \
              Access and data control > API controls > Manage Domain Wide Delegation > Add new, \
              enter the service account's numeric client ID (client_id in its key file) and the \
              scope https://mail.google.com/ exactly; it can take a few minutes to apply",
    },
    Known {
        needle: "Invalid email or User ID",
        fix: "Google does not know the mailbox the service account acts as (invalid_grant: \
              Invalid email or User ID): the account's mailbox (or its login) must be a user of \
              the Workspace domain that delegated the scope, not an alias, a group or a user of \
              another domain",
    },
    Known {
        needle: "Token has been expired or revoked",
        fix: "Google revoked the refresh token: an app whose OAuth consent screen is in \
              \"Testing\" gets refresh tokens that die after 7 days; publish it (Google Cloud \
              console > Google Auth Platform > Audience > Publish app) or make it Internal, then \
              run `oxbridge login <account> --browser` (or --paste). A password change or the \
              user removing the app's access at myaccount.google.com > Security does the same",
    },
    Known {
        needle: "Invalid JWT Signature",
        fix: "Google refused the service account's signature: its key was deleted or the key \
              file is another service account's; create a new JSON key (Google Cloud console > \
              IAM & Admin > Service accounts > the account > Keys) and point \
              service_account_file at it",
    },
    Known {
        needle: "not enabled for IMAP",
        fix: "Gmail has IMAP turned off for this user: in the Google Admin console > Apps > \
              Google Workspace > Gmail > End User Access, turn on POP and IMAP access for the \
              user's organizational unit (allow all mail clients, or add oxbridge's OAuth client \
              ID to the allowed ones)",
    },
    Known {
        needle: "not enabled for POP",
        fix: "Gmail has POP turned off for this user: turn on POP and IMAP access in the Google \
              Admin console (Apps > Google Workspace > Gmail > End User Access), then POP for \
              the mailbox in its Gmail settings (See all settings > Forwarding and POP/IMAP > \
              Enable POP)",
    },
    // Outlook.com (personal Microsoft accounts) and High Volume Email.
    Known {
        needle: "not enabled for consumers",
        fix: "the app is not registered for personal Microsoft accounts: in the Entra admin \
              center > App registrations, register an app whose supported account types include \
              \"personal Microsoft accounts\" (Authentication > Supported accounts), allow \
              public client flows, and put its client ID in the outlook.com [[provider]]",
    },
    Known {
        needle: "5.5.127",
        fix: "Microsoft's High Volume Email refused a token about to expire (501 5.5.127 Token \
              will expire soon): keep [oauth] smtp_token_left_s at 600 or more (the default) so \
              that SMTP logins get a token with at least 10 minutes left",
    },
    // Entra ID token endpoint.
    Known {
        needle: "AADSTS90002",
        fix: "the tenant does not exist: check [oauth] tenant (the tenant's domain or id, or \
              \"organizations\")",
    },
    Known {
        needle: "AADSTS7000222",
        fix: "the client secret has expired: create a new one (Entra admin center > App \
              registrations > <app> > Certificates & secrets) and put it in client_secret_file",
    },
    Known {
        needle: "AADSTS7000215",
        fix: "the client secret is wrong: copy the secret's Value (not its ID) from Entra admin \
              center > App registrations > <app> > Certificates & secrets into client_secret_file",
    },
    Known {
        needle: "AADSTS700016",
        fix: "no application with this client_id in the tenant: check [oauth] client_id and tenant, \
              or have an administrator consent to the app in this tenant",
    },
    Known {
        needle: "AADSTS65001",
        fix: "consent is missing: grant admin consent for the app's API permissions (Entra admin \
              center > App registrations > <app> > API permissions > Grant admin consent)",
    },
    Known {
        needle: "AADSTS50076",
        fix: "MFA is required for this user, which the password grant cannot satisfy: exclude the \
              account from MFA with a Conditional Access policy for trusted locations, or use \
              grant = \"refresh_token\" and `oxbridge login`",
    },
    Known {
        needle: "AADSTS50079",
        fix: "the user must register for MFA, which the password grant cannot do: use \
              grant = \"refresh_token\" and `oxbridge login`, or exclude the account from MFA",
    },
    Known {
        needle: "AADSTS50126",
        fix: "the user's password is wrong (password grant): the device must send the mailbox \
              user's current Entra password",
    },
    Known {
        needle: "AADSTS50034",
        fix: "the user does not exist in the tenant: check the login the device sends",
    },
    Known {
        needle: "AADSTS53003",
        fix: "a Conditional Access policy blocked the sign-in (many tenants block the device code \
              flow this way): for `oxbridge login`, consent with `oxbridge login <account> --paste` \
              (or `--browser`) instead; otherwise see Entra admin center > Sign-in logs for the \
              policy and exclude oxbridge's sign-ins from it",
    },
    Known {
        needle: "AADSTS700025",
        fix: "the app is a public client, which must not send a secret: remove client_secret and \
              client_secret_file from [oauth] for delegated grants, or make the app confidential \
              (App registrations > <app> > Authentication > Allow public client flows: No) and \
              keep the secret",
    },
    Known {
        needle: "AADSTS7000229",
        fix: "the app has no service principal (enterprise application) in this tenant: have an \
              administrator grant admin consent to the app in this tenant (Entra admin center > \
              App registrations > <app> > API permissions > Grant admin consent), or create it \
              with `New-MgServicePrincipal -AppId <client_id>`",
    },
    Known {
        needle: "AADSTS7000218",
        fix: "the token endpoint wants a client secret or assertion: set client_secret_file, or \
              for a public client allow public client flows (App registrations > <app> > \
              Authentication > Allow public client flows: Yes)",
    },
    Known {
        needle: "AADSTS70011",
        fix: "the requested scope is invalid for this app: check the app's API permissions \
              (Office 365 Exchange Online: SMTP.Send, IMAP.AccessAsUser.All, \
              POP.AccessAsUser.All; app-only: the .default scope)",
    },
    Known {
        needle: "AADSTS700082",
        fix: "the refresh token has expired: run `oxbridge login <account>`",
    },
    Known {
        needle: "AADSTS70043",
        fix: "the refresh token has expired under a Conditional Access sign-in frequency: run \
              `oxbridge login <account>`",
    },
    Known {
        needle: "invalid_grant",
        fix: "the grant was refused (expired or revoked refresh token, or wrong password): for a \
              refresh_token account run `oxbridge login <account>`",
    },
    Known {
        needle: "invalid_client",
        fix: "the token endpoint refused the app's credentials: check [oauth] client_id and the \
              client secret or certificate",
    },
];

/// The administrator's fix for this failure, when it is a known one.
pub fn fix(error: &AuthError) -> Option<&'static str> {
    let detail =
        match error {
            AuthError::TokenRefused(d)
            | AuthError::TokenUnavailable(d)
            | AuthError::UpstreamRefused(d)
            | AuthError::UpstreamTemporary(d)
            | AuthError::UpstreamUnavailable(d) => d.as_str(),
            AuthError::BadCredentials(_) | AuthError::Throttled(_) => return None,
            AuthError::Busy(_) => {
                return Some(
                    "the mailbox already has as many upstream sessions as [limits] allows \
                 (smtp_sessions_per_mailbox, imap_sessions_per_mailbox, \
                 pop3_sessions_per_mailbox): spread the devices over more mailboxes, or find the \
                 device that keeps its sessions open (the status page's upstream sessions); \
                 Exchange Online allows no more than 3 SMTP and 20 IMAP sessions per mailbox",
                )
            }
            AuthError::CannotSpool(_) => {
                return Some(
                    "a listener with delivery = \"spool\" sends later, without the device's \
                 password, so grant = \"password\" accounts cannot use it: give the device an \
                 account with client_credentials or refresh_token, or a listener with \
                 delivery = \"session\"",
                )
            }
            AuthError::ProtocolNotAllowed(_) => return Some(
                "the account's protocols leave this protocol out: if this device should use it, \
                 add it to protocols in the account's [[account]] and reload; if not, the device \
                 is misconfigured, or someone who has its password is trying it",
            ),
            AuthError::Authorization(_) => {
                return Some(
                    "the device sent a SASL authorization identity other than its user name \
                 (Cyrus SASL: drop -u/authzid); to send as a shared mailbox, log in as \
                 login\\shared@domain on an account with allow_shared",
                )
            }
        };
    let lower = detail.to_ascii_lowercase();
    KNOWN
        .iter()
        .find(|k| lower.contains(&k.needle.to_ascii_lowercase()))
        .map(|k| k.fix)
}

/// The fix for an upstream's reply to a relayed command (MAIL, RCPT,
/// DATA), when it is a known refusal.
pub fn reply_advice(reply: &str) -> Option<&'static str> {
    advice(&AuthError::UpstreamRefused(reply.to_string()))
}

/// A short diagnosis for other failures that have an obvious next step.
pub fn hint(error: &AuthError) -> Option<&'static str> {
    match error {
        AuthError::UpstreamUnavailable(d) if d.contains("certificate") => Some(
            "the upstream's TLS certificate was not accepted: check [upstream] names the server \
             as its certificate does, and add a private CA with [upstream] ca_file",
        ),
        AuthError::UpstreamUnavailable(_) => {
            Some("the upstream could not be reached: check [upstream] and the network/firewall")
        }
        AuthError::TokenUnavailable(_) => Some(
            "the token endpoint could not be reached or failed: check [oauth] token_url/tenant and \
             outbound HTTPS",
        ),
        _ => None,
    }
}

/// [`fix`], else [`hint`].
pub fn advice(error: &AuthError) -> Option<&'static str> {
    fix(error).or_else(|| hint(error))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(s: &str) -> AuthError {
        AuthError::UpstreamRefused(s.into())
    }

    #[test]
    fn exchange_replies_map_to_their_fix() {
        let cases = [
            ("535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the Tenant.", "Set-TransportConfig -SmtpClientAuthenticationDisabled $false"),
            ("535 5.7.3 Authentication unsuccessful", "New-ServicePrincipal"),
            ("530 5.7.57 Client not authenticated to send mail.", "5.7.57"),
            ("550 5.7.30 Basic authentication is not supported for Client Submission.", "SMTP.SendAsApp"),
            ("554 5.2.252 SendAsDenied; scans@contoso.com not allowed to send as x@y", "Add-RecipientPermission"),
            ("432 4.3.2 STOREDRV.ClientSubmit; sender thread limit exceeded", "smtp_sessions_per_mailbox"),
            ("535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the Mailbox. Visit https://aka.ms/smtp_auth_disabled for more information.", "a value of $true on the mailbox"),
            ("535 5.7.139 Authentication unsuccessful, the request did not meet the criteria to be authenticated successfully.", "security defaults"),
            ("550 5.7.60 SMTP; Client does not have permissions to send as this sender.", "Add-RecipientPermission"),
            ("550 5.5.105 High Volume Email only allows sending to internal recipients.", "High Volume Email"),
            ("NO User is authenticated but not connected.", "-ImapEnabled $true"),
            ("554 5.2.0 STOREDRV.Submission.Exception:SendAsDeniedException.MapiExceptionSendAsDenied", "Add-RecipientPermission"),
            ("553 5.7.1 <boss@example.test>: Sender address rejected: not owned by user alice@example.test", "rewrite_sender"),
            ("452 4.3.1 Insufficient system resources", "try again later"),
        ];
        for (reply, expect) in cases {
            let fix = fix(&refused(reply)).unwrap_or_else(|| panic!("no fix for {reply}"));
            assert!(fix.contains(expect), "{reply}: {fix}");
        }
    }

    #[test]
    fn entra_errors_map_to_their_fix() {
        let cases = [
            ("invalid_request: AADSTS90002: Tenant 'x' not found.", "[oauth] tenant"),
            ("invalid_client: AADSTS7000215: Invalid client secret provided.", "Certificates & secrets"),
            ("invalid_grant: AADSTS65001: The user or administrator has not consented", "Grant admin consent"),
            ("invalid_grant: AADSTS50076: Due to a configuration change made by your administrator, you must use multi-factor authentication", "MFA"),
            ("invalid_grant: AADSTS700082: The refresh token has expired", "oxbridge login"),
            ("invalid_grant: AADSTS53003: Access has been blocked by Conditional Access policies.", "--paste"),
            ("invalid_client: AADSTS700025: Client is public so neither 'client_assertion' nor 'client_secret' should be presented.", "remove client_secret"),
            ("unauthorized_client: AADSTS7000229: The client application 00000000-0000-0000-0000-000000000000 is missing service principal in the tenant.", "New-MgServicePrincipal"),
            ("invalid_grant: something else", "oxbridge login"),
            ("unauthorized_client: AADSTS700016: Application with identifier 'x' was not found in the directory '9188040d-6c67-4c5b-b112-36a304b66dad'. The client does not exist or is not enabled for consumers.", "personal Microsoft accounts"),
        ];
        for (detail, expect) in cases {
            let fix = fix(&AuthError::TokenRefused(detail.into()))
                .unwrap_or_else(|| panic!("no fix for {detail}"));
            assert!(fix.contains(expect), "{detail}: {fix}");
        }
    }

    #[test]
    fn google_and_hve_refusals_map_to_their_fix() {
        let cases = [
            ("unauthorized_client: Client is unauthorized to retrieve access tokens using this method, or client not authorized for any of the scopes requested.", "Domain Wide Delegation"),
            ("invalid_grant: Invalid email or User ID", "user of the Workspace domain"),
            ("invalid_grant: Token has been expired or revoked.", "Publish app"),
            ("invalid_grant: Invalid JWT Signature.", "new JSON key"),
            ("NO [ALERT] Your account is not enabled for IMAP use. Please visit your Gmail settings page and enable your account for IMAP access. (Failure)", "POP and IMAP access"),
            ("-ERR [SYS/PERM] Your account is not enabled for POP access.", "Enable POP"),
            ("501 5.5.127 Authentication unsuccessful, Token will expire soon.", "smtp_token_left_s"),
        ];
        for (detail, expect) in cases {
            let fix = fix(&AuthError::TokenRefused(detail.into()))
                .unwrap_or_else(|| panic!("no fix for {detail}"));
            assert!(fix.contains(expect), "{detail}: {fix}");
        }
    }

    #[test]
    fn unknown_and_local_failures_have_no_fix() {
        assert_eq!(
            fix(&refused("535 5.7.8 Error: authentication failed")),
            None
        );
        assert_eq!(fix(&AuthError::BadCredentials("wrong password")), None);
        assert!(advice(&AuthError::UpstreamUnavailable("connection refused".into())).is_some());
    }
}
