//! The throttle's bypasses, each closed: tests of `throttle`.

use super::*;

fn throttle(failures: u32) -> Throttle {
    Throttle::new(
        &LimitsConfig {
            login_delay_ms: 100,
            login_lockout_failures: failures,
            login_lockout_s: 60,
            ..Default::default()
        },
        Arc::new(State::File(None)),
    )
}

const A: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 1));
const B: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 2));

fn claim(credential: &str) -> Claim {
    Claim {
        credential: credential.into(),
        shared: None,
    }
}

/// One wrong password: counted, then failed; its delay.
async fn fail(t: &Throttle, ip: IpAddr, c: &Claim) -> Duration {
    t.begin(ip, c).await.unwrap().failed().await
}

#[tokio::test(start_paused = true)]
async fn delays_double_then_lock_out_even_correct_passwords() {
    let t = throttle(5);
    let u = claim("u@x");
    let mut delays = Vec::new();
    for _ in 0..4 {
        delays.push(fail(&t, A, &u).await.as_millis());
    }
    assert_eq!(delays, [100, 200, 400, 800]);
    fail(&t, A, &u).await;
    assert_eq!(t.begin(A, &u).await.err(), Some(ADDRESS_LOCKED));
    // Another account from the same address: the address is locked.
    assert!(t.begin(A, &claim("other@x")).await.is_err());
    // The same account from elsewhere: the account is locked.
    assert_eq!(t.begin(B, &claim("U@x")).await.err(), Some(ACCOUNT_LOCKED));
    assert_eq!(t.refused.load(Ordering::Relaxed), 3);
    tokio::time::advance(Duration::from_secs(61)).await;
    assert!(t.begin(A, &u).await.is_ok());
}

#[tokio::test(start_paused = true)]
async fn success_clears_its_claim_and_old_failures_expire() {
    let t = throttle(3);
    let u = claim("u@x");
    fail(&t, A, &u).await;
    fail(&t, B, &u).await;
    t.begin(B, &u).await.unwrap().succeeded().await;
    // The account starts again; the address B keeps its failure.
    assert_eq!(fail(&t, A, &u).await, Duration::from_millis(200));
    tokio::time::advance(WINDOW).await;
    assert_eq!(fail(&t, A, &u).await, Duration::from_millis(100));
    // The delay is capped.
    let t = throttle(100);
    let mut last = Duration::ZERO;
    for _ in 0..20 {
        last = fail(&t, B, &claim("v@x")).await;
    }
    assert_eq!(last, MAX_DELAY);
}

/// An attacker with one working password cannot use it to wipe the
/// failures of their address.
#[tokio::test(start_paused = true)]
async fn a_success_does_not_clear_the_address() {
    let t = throttle(3);
    for _ in 0..2 {
        fail(&t, A, &claim("victim@x")).await;
        t.begin(A, &claim("mine@x"))
            .await
            .unwrap()
            .succeeded()
            .await;
    }
    fail(&t, A, &claim("victim@x")).await;
    assert_eq!(
        t.begin(A, &claim("mine@x")).await.err(),
        Some(ADDRESS_LOCKED)
    );
}

/// Every user of a `*@domain` account with one password hash is that
/// account: rotating the user name (and the address) counts together.
/// For the `password` grant each user is its own credential.
#[tokio::test(start_paused = true)]
async fn rotating_users_of_a_pattern_account_share_its_counter() {
    use crate::config::{AccountConfig, Grant, SendVia};
    let account = |login: &str, grant, hash: Option<&str>| AccountConfig {
        login: login.into(),
        grant,
        password_hash: hash.map(|h| secrecy::SecretString::from(h.to_string())),
        mailbox: None,
        allow_shared: Vec::new(),
        allowed_senders: Vec::new(),
        send: None,
        rewrite_sender: false,
        protocols: None,
        provider: None,
    };
    let accounts = crate::accounts::Accounts::new(
        SendVia::Smtp,
        &[
            account("*@p.test", Grant::ClientCredentials, Some("$argon2id$x")),
            account("*@own.test", Grant::Password, None),
        ],
        &crate::config::provider::test_providers(),
    );
    let t = throttle(3);
    for (i, ip) in [A, B, IpAddr::from([192, 0, 2, 3])].into_iter().enumerate() {
        fail(&t, ip, &accounts.claim(&format!("U{i}@p.test"))).await;
    }
    let next = accounts.claim("u9@p.test\\hr@p.test");
    assert_eq!(next.credential, "*@p.test");
    assert_eq!(next.shared.as_deref(), Some("hr@p.test"));
    let four = IpAddr::from([192, 0, 2, 4]);
    assert_eq!(t.begin(four, &next).await.err(), Some(ACCOUNT_LOCKED));
    assert_eq!(accounts.claim("Ann@own.test").credential, "ann@own.test");
    assert!(t.begin(four, &accounts.claim("ann@own.test")).await.is_ok());
}

/// Guesses sent at once: only as many as failures may still be counted
/// are checked; the others wait, and are refused once those failed.
#[tokio::test(start_paused = true)]
async fn parallel_guesses_wait_for_the_ones_being_checked() {
    let t = Arc::new(throttle(3));
    let u = claim("u@x");
    let first: Vec<Attempt<'_>> = vec![
        t.begin(A, &u).await.unwrap(),
        t.begin(B, &u).await.unwrap(),
        t.begin(A, &u).await.unwrap(),
    ];
    let waiting = {
        let (t, u) = (t.clone(), u.clone());
        tokio::spawn(async move { t.begin(B, &u).await.map(|_| ()) })
    };
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert!(!waiting.is_finished(), "a fourth guess is not checked yet");
    for a in first {
        a.failed().await;
    }
    assert_eq!(waiting.await.unwrap(), Err(ACCOUNT_LOCKED));

    // Correct logins at once just take turns.
    let t = Arc::new(throttle(2));
    let logins: Vec<_> = (0..6)
        .map(|_| {
            let t = t.clone();
            tokio::spawn(async move {
                let a = t.begin(A, &claim("printer@x")).await?;
                tokio::time::sleep(Duration::from_millis(50)).await;
                a.succeeded().await;
                Ok::<(), &str>(())
            })
        })
        .collect();
    for l in logins {
        assert_eq!(l.await.unwrap(), Ok(()));
    }
}

/// An attempt that ends otherwise (the upstream was down) is forgotten;
/// one that waits too long is refused for now.
#[tokio::test(start_paused = true)]
async fn unsettled_attempts_are_forgotten_and_waits_are_bounded() {
    let t = throttle(1);
    let u = claim("u@x");
    drop(t.begin(A, &u).await.unwrap());
    let held = t.begin(A, &u).await.unwrap();
    let started = Instant::now();
    assert_eq!(t.begin(B, &u).await.err(), Some(TOO_MANY_WAITING));
    assert_eq!(started.elapsed(), CHECK_WAIT);
    drop(held);
    let mut turns = Vec::new();
    for _ in 0..MAX_WAITING_CHECKS {
        turns.push(t.check_turn().await.unwrap());
    }
    assert_eq!(t.check_turn().await.err(), Some(TOO_MANY_WAITING));
    turns.pop();
    assert!(t.check_turn().await.is_ok());
}

/// An IPv6 host is given a /64 at least: rotating the low bits of its
/// address is not a fresh counter.
#[tokio::test(start_paused = true)]
async fn an_ipv6_network_of_64_bits_is_one_address() {
    let t = throttle(3);
    for i in 1..=3u16 {
        let ip: IpAddr = format!("2001:db8:1:2::{i:x}").parse().unwrap();
        fail(&t, ip, &claim(&format!("u{i}@x"))).await;
    }
    let next: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
    assert_eq!(
        t.begin(next, &claim("v@x")).await.err(),
        Some(ADDRESS_LOCKED)
    );
    let elsewhere: IpAddr = "2001:db8:1:3::1".parse().unwrap();
    assert!(t.begin(elsewhere, &claim("v@x")).await.is_ok());
    // IPv4, also mapped into IPv6, stays per address.
    let mapped: IpAddr = "::ffff:192.0.2.9".parse().unwrap();
    assert!(t.begin(mapped, &claim("w@x")).await.is_ok());
}

/// The census says what is remembered: an attempt while it is checked,
/// failures until their window ends, a lockout until it ends; then nothing.
#[tokio::test(start_paused = true)]
async fn the_census_comes_back_to_zero() {
    let t = throttle(2);
    let u = claim("u@x");
    assert_eq!(t.census(), Census::default());
    let attempt = t.begin(A, &u).await.unwrap();
    assert_eq!(
        t.census(),
        Census {
            entries: 0,
            checking: 1
        }
    );
    drop(attempt);
    assert_eq!(t.census(), Census::default());
    fail(&t, A, &u).await;
    // The address and the account.
    assert_eq!(
        t.census(),
        Census {
            entries: 2,
            checking: 0
        }
    );
    t.begin(B, &u).await.unwrap().succeeded().await;
    // The account's failures are cleared by its right password.
    assert_eq!(
        t.census(),
        Census {
            entries: 1,
            checking: 0
        }
    );
    tokio::time::advance(WINDOW).await;
    assert_eq!(t.census(), Census::default());
    fail(&t, A, &u).await;
    fail(&t, A, &u).await;
    assert_eq!(t.census().entries, 2);
    // Locked for 60 s: the lockout ends before the window.
    tokio::time::advance(Duration::from_secs(61)).await;
    assert_eq!(t.census(), Census::default());
}
