//! Which `[[relay]]` networks are private, and which are wide: a relay
//! rule is a password that is an address, so a network that reaches past
//! the operator's own is an open relay.
//!
//! Private: RFC 1918 (`10.0.0.0/8`, `172.16.0.0/12`, `192.168.0.0/16`),
//! loopback (`127.0.0.0/8`, `::1`), link-local (`169.254.0.0/16`,
//! `fe80::/10`) and IPv6 unique local addresses (`fc00::/7`); an
//! IPv4-mapped IPv6 network (`::ffff:192.168.10.0/120`) is its IPv4
//! network. Everything else is public, the shared address space of
//! carrier-grade NAT (`100.64.0.0/10`) included: its other hosts are the
//! provider's other customers.
//!
//! Wide: a private network shorter than [`WIDE_V4_PREFIX`] (IPv4) or
//! [`WIDE_V6_PREFIX`] (IPv6), but for loopback and link-local networks,
//! which reach no further than this host and its link.
//!
//! Promises: a public network in `from_networks` is a config error unless
//! the rule sets `allow_public_networks = true`, and that key is refused
//! on a rule without one; wide private networks and allowed public ones
//! each get a WARNING line from `oxbridge check`.

use ipnet::{IpNet, Ipv4Net};

use super::RelayConfig;

/// An IPv4 relay network shorter than this prefix gets a warning.
pub const WIDE_V4_PREFIX: u8 = 16;
/// An IPv6 relay network shorter than this prefix gets a warning.
pub const WIDE_V6_PREFIX: u8 = 48;

/// The private ranges, as described above.
const PRIVATE: [&str; 8] = [
    "10.0.0.0/8",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "127.0.0.0/8",
    "169.254.0.0/16",
    "::1/128",
    "fc00::/7",
    "fe80::/10",
];
/// The private ranges that reach no further than this host or its link.
const LOCAL: [&str; 4] = ["127.0.0.0/8", "169.254.0.0/16", "::1/128", "fe80::/10"];

fn within(net: &IpNet, ranges: &[&str]) -> bool {
    ranges.iter().any(|r| {
        r.parse::<IpNet>()
            .is_ok_and(|range| range.contains(&normal(net)))
    })
}

/// `net` without host bits; an IPv4-mapped IPv6 network as its IPv4 one.
fn normal(net: &IpNet) -> IpNet {
    if let IpNet::V6(v6) = net {
        if let (Some(v4), Some(len)) = (v6.addr().to_ipv4_mapped(), v6.prefix_len().checked_sub(96))
        {
            if let Ok(v4) = Ipv4Net::new(v4, len) {
                return IpNet::V4(v4.trunc());
            }
        }
    }
    net.trunc()
}

/// Whether every address of `net` is private.
pub fn is_private(net: &IpNet) -> bool {
    within(net, &PRIVATE)
}

/// Whether `net` is a private network wider than a site's usual subnets.
pub fn is_wide(net: &IpNet) -> bool {
    let net = normal(net);
    let short = match net {
        IpNet::V4(n) => n.prefix_len() < WIDE_V4_PREFIX,
        IpNet::V6(n) => n.prefix_len() < WIDE_V6_PREFIX,
    };
    short && is_private(&net) && !within(&net, &LOCAL)
}

/// What a public network is, in an error or a warning.
fn public(text: &str, net: &IpNet) -> String {
    match normal(net) {
        IpNet::V4(n) if n.prefix_len() == 0 => format!("{text:?} is every IPv4 address"),
        IpNet::V6(n) if n.prefix_len() == 0 => format!("{text:?} is every IPv6 address"),
        _ => format!("{text:?} holds public addresses"),
    }
}

/// One rule's networks against its `allow_public_networks` (`key` is
/// `relay[N]`; the networks have been parsed already).
pub fn check_relay(key: &str, r: &RelayConfig) -> Result<(), String> {
    let mut any_public = false;
    for text in &r.from_networks {
        let Ok(net) = text.parse::<IpNet>() else {
            continue;
        };
        if is_private(&net) {
            continue;
        }
        any_public = true;
        if !r.allow_public_networks {
            return Err(format!(
                "{key}.from_networks: {}: every host there could send mail as {} without a password (an open relay). List only your devices' private networks (like 192.168.10.0/24, or a device's own /32); if public addresses really must relay, set {key}.allow_public_networks = true and firewall the listener",
                public(text, &net),
                r.account
            ));
        }
    }
    if r.allow_public_networks && !any_public {
        return Err(format!(
            "{key}.allow_public_networks: every network in from_networks is private; remove it"
        ));
    }
    Ok(())
}

/// The WARNING lines of `oxbridge check` for relay networks: public ones
/// the operator allowed, and wide private ones.
pub fn relay_warnings(relays: &[RelayConfig]) -> Vec<String> {
    let mut lines = Vec::new();
    for (i, r) in relays.iter().enumerate() {
        for text in &r.from_networks {
            let Ok(net) = text.parse::<IpNet>() else {
                continue;
            };
            let why = if !is_private(&net) {
                format!(
                    "{} and relays as {} without a password (allow_public_networks = true); make sure a firewall lets only your devices reach the SMTP listeners",
                    public(text, &net),
                    r.account
                )
            } else if is_wide(&net) {
                let limit = match normal(&net) {
                    IpNet::V4(_) => WIDE_V4_PREFIX,
                    IpNet::V6(_) => WIDE_V6_PREFIX,
                };
                format!(
                    "{text:?} is wider than /{limit}: every host in it relays as {} without a password; list the devices' own subnets or addresses instead (like 192.168.10.0/24 or 192.168.10.7/32)",
                    r.account
                )
            } else {
                continue;
            };
            lines.push(format!("relay[{i}].from_networks: WARNING: {why}"));
        }
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    fn rule(networks: &[&str], allow: bool) -> RelayConfig {
        RelayConfig {
            from_networks: networks.iter().map(|n| n.to_string()).collect(),
            account: "scanner@contoso.com".into(),
            allowed_senders: Vec::new(),
            allow_public_networks: allow,
        }
    }

    #[test]
    fn private_networks_are_rfc1918_loopback_link_local_and_ula_only() {
        for private in [
            "10.0.0.0/8",
            "10.1.2.3/32",
            "172.16.0.0/12",
            "172.31.255.0/24",
            "192.168.10.0/24",
            "192.168.10.7/24",
            "127.0.0.2/32",
            "169.254.1.0/24",
            "::1/128",
            "fd00:10::/64",
            "fc00::/7",
            "fe80::/64",
            "::ffff:192.168.10.0/120",
        ] {
            assert!(is_private(&net(private)), "{private}");
        }
        for public in [
            "0.0.0.0/0",
            "::/0",
            "8.8.8.0/24",
            "172.32.0.0/16",
            "10.0.0.0/7",
            "192.168.0.0/15",
            "100.64.0.0/10",
            "0.0.0.0/8",
            "2001:db8::/32",
            "fc00::/6",
            "::ffff:0.0.0.0/96",
            "::ffff:8.8.8.8/128",
        ] {
            assert!(!is_private(&net(public)), "{public}");
        }
    }

    #[test]
    fn wide_means_shorter_than_16_or_48_and_never_loopback_or_link_local() {
        for wide in [
            "10.0.0.0/8",
            "172.16.0.0/12",
            "172.16.0.0/13",
            "fd00::/8",
            "fd00::/47",
        ] {
            assert!(is_wide(&net(wide)), "{wide}");
        }
        for narrow in [
            "192.168.0.0/16",
            "10.20.0.0/16",
            "fd00:10::/48",
            "fd00:10::/64",
            "127.0.0.0/8",
            "fe80::/10",
            "8.8.0.0/8",
        ] {
            assert!(!is_wide(&net(narrow)), "{narrow}");
        }
    }

    #[test]
    fn a_public_network_is_refused_unless_allowed_and_the_key_only_with_one() {
        let err =
            check_relay("relay[0]", &rule(&["192.168.10.0/24", "0.0.0.0/0"], false)).unwrap_err();
        assert!(
            err.starts_with("relay[0].from_networks: \"0.0.0.0/0\" is every IPv4 address: every host there could send mail as scanner@contoso.com without a password (an open relay)."),
            "{err}"
        );
        assert!(
            err.contains("set relay[0].allow_public_networks = true"),
            "{err}"
        );
        let err = check_relay("relay[1]", &rule(&["::/0"], false)).unwrap_err();
        assert!(err.contains("\"::/0\" is every IPv6 address"), "{err}");
        let err = check_relay("relay[0]", &rule(&["203.0.113.7/32"], false)).unwrap_err();
        assert!(
            err.contains("\"203.0.113.7/32\" holds public addresses"),
            "{err}"
        );
        assert_eq!(
            check_relay("relay[0]", &rule(&["203.0.113.7/32"], true)),
            Ok(())
        );
        assert_eq!(
            check_relay("relay[0]", &rule(&["10.0.0.0/8"], false)),
            Ok(())
        );
        assert_eq!(
            check_relay("relay[0]", &rule(&["10.1.0.0/16"], true)),
            Err("relay[0].allow_public_networks: every network in from_networks is private; remove it".into())
        );
    }

    #[test]
    fn check_warns_for_wide_private_and_allowed_public_networks_only() {
        let rules = [
            rule(&["192.168.10.0/24", "10.0.0.0/8"], false),
            rule(&["203.0.113.0/24"], true),
            rule(&["fd00::/8", "127.0.0.0/8"], false),
        ];
        assert_eq!(
            relay_warnings(&rules),
            [
                "relay[0].from_networks: WARNING: \"10.0.0.0/8\" is wider than /16: every host in it relays as scanner@contoso.com without a password; list the devices' own subnets or addresses instead (like 192.168.10.0/24 or 192.168.10.7/32)",
                "relay[1].from_networks: WARNING: \"203.0.113.0/24\" holds public addresses and relays as scanner@contoso.com without a password (allow_public_networks = true); make sure a firewall lets only your devices reach the SMTP listeners",
                "relay[2].from_networks: WARNING: \"fd00::/8\" is wider than /48: every host in it relays as scanner@contoso.com without a password; list the devices' own subnets or addresses instead (like 192.168.10.0/24 or 192.168.10.7/32)",
            ]
        );
        assert!(relay_warnings(&[rule(&["192.168.0.0/16"], false)]).is_empty());
    }
}
