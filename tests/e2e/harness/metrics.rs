//! The admin endpoint over HTTP, as a monitoring system sees it: `curl`,
//! and Prometheus metrics scraped and summed by name and labels.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::process::Command;

use super::{run, Proxy, CLIENT_LIMIT};

/// `curl` an admin URL: (HTTP status, body).
pub fn curl(addr: SocketAddr, path: &str) -> (u16, String) {
    let out = run(
        Command::new("curl").args([
            "-sS",
            "-m",
            "20",
            "-w",
            "\n%{http_code}",
            &format!("http://{addr}{path}"),
        ]),
        CLIENT_LIMIT,
    );
    let all = String::from_utf8_lossy(&out.stdout).to_string();
    let (body, code) = all.rsplit_once('\n').expect("curl output");
    (code.trim().parse().unwrap_or(0), body.to_string())
}

/// Prometheus text format: series (name with its labels) -> value.
pub fn scrape(addr: SocketAddr) -> HashMap<String, f64> {
    let (status, body) = curl(addr, "/metrics");
    assert_eq!(status, 200, "{body}");
    body.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| {
            let (series, value) = l.rsplit_once(' ').expect("series value");
            (series.to_string(), value.parse::<f64>().expect(l))
        })
        .collect()
}

/// The sum of the series of `name` that carry all of `labels`.
pub fn value(m: &HashMap<String, f64>, name: &str, labels: &[(&str, &str)]) -> f64 {
    m.iter()
        .filter(|(series, _)| {
            series.split('{').next() == Some(name)
                && labels
                    .iter()
                    .all(|(k, v)| series.contains(&format!("{k}=\"{v}\"")))
        })
        .map(|(_, v)| v)
        .sum()
}

/// The sum of a metric's series, scraped from the proxy's admin endpoint.
pub fn metric(proxy: &Proxy, name: &str) -> f64 {
    value(&scrape(proxy.admin_addr()), name, &[])
}

/// The `[admin]` section for an admin endpoint on a free loopback port.
pub const ADMIN: &str = "[admin]\nlisten = \"127.0.0.1:0\"\n";
