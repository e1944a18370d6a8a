//! The fixes for what the operator, not a device, must put right before
//! oxbridge can serve: a port it may not bind, a directory it may not
//! write. Both `oxbridge check` and `oxbridge run` print them, so that the
//! two say the same thing (`preflight.rs` runs the checks; the errors of
//! certificates and keys are `net/device_tls.rs`'s, those of the config
//! file the config's).
//!
//! Promises: pure text, no I/O but asking who this process runs as; each
//! text names the key at fault and ends with `Fix: ...` where one exists.

use std::io;
use std::net::SocketAddr;
use std::path::Path;

/// The lowest port an unprivileged process may bind (Linux's default
/// `net.ipv4.ip_unprivileged_port_start`).
pub const FIRST_UNPRIVILEGED_PORT: u16 = 1024;

/// `KEY: cannot bind ADDR: ERROR`, and the fix for the errors that have
/// one.
pub fn bind_error(key: &str, addr: SocketAddr, e: &io::Error) -> String {
    let fix = match e.kind() {
        io::ErrorKind::PermissionDenied if addr.port() < FIRST_UNPRIVILEGED_PORT => Some(format!(
            "ports below {FIRST_UNPRIVILEGED_PORT} need CAP_NET_BIND_SERVICE: keep the systemd \
             unit's AmbientCapabilities=CAP_NET_BIND_SERVICE line, or give the binary the \
             capability (setcap 'cap_net_bind_service=+ep' /usr/local/bin/oxbridge), or listen \
             on a port of {FIRST_UNPRIVILEGED_PORT} or above (a firewall or load balancer can \
             forward {} to it)",
            addr.port()
        )),
        io::ErrorKind::AddrInUse => Some(in_use_fix(addr)),
        io::ErrorKind::AddrNotAvailable => Some(
            "no interface of this machine has that address: use one `ip -brief address` \
             shows, or 0.0.0.0 (every interface)"
                .to_string(),
        ),
        _ => None,
    };
    match fix {
        Some(fix) => format!("{key}: cannot bind {addr}: {e}. Fix: {fix}"),
        None => format!("{key}: cannot bind {addr}: {e}"),
    }
}

/// Where to look when a port is taken.
fn in_use_fix(addr: SocketAddr) -> String {
    format!(
        "another program listens there (ss -ltnp 'sport = :{}' names it): stop it, or choose \
         another port",
        addr.port()
    )
}

/// `check`'s warning for a port in use now: before a reload the running
/// oxbridge holds its own ports, so this cannot fail the check.
pub fn in_use_warning(key: &str, addr: SocketAddr) -> String {
    format!(
        "{key}: WARNING: {addr} is in use now: fine if it is this oxbridge's own (it runs \
         already); if not, `oxbridge run` will fail there, and {}",
        in_use_fix(addr)
    )
}

/// `WHAT: DIR: not writable by USER: ERROR. Fix: ...`: a directory that
/// `run` writes (`state_dir`, the spool) but this user may not.
pub fn not_writable(what: &str, dir: &Path, user: &str, e: &io::Error) -> String {
    let problem = format!("{what}: {}: not writable by {user}: {e}", dir.display());
    match e.kind() {
        io::ErrorKind::PermissionDenied => format!("{problem}. Fix: {}", owner_fix(dir)),
        io::ErrorKind::ReadOnlyFilesystem => format!(
            "{problem}. Fix: the file system is read-only here: point it at a writable place \
             (with the shipped systemd unit, under /var/lib/oxbridge, its StateDirectory)"
        ),
        _ => problem,
    }
}

/// Who must own a directory oxbridge writes.
pub fn owner_fix(dir: &Path) -> String {
    format!(
        "the user oxbridge runs as must own it: with the shipped systemd unit, \
         StateDirectory=oxbridge gives the service /var/lib/oxbridge (keep state_dir and the \
         spool there); otherwise `chown -R USER: {}` for the user that runs oxbridge (and run \
         `oxbridge check` as that user)",
        dir.display()
    )
}

/// This process's user, as `name (uid N)` (`uid N` if it has no name:
/// a systemd DynamicUser outside its unit).
pub fn user() -> String {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let uid = unsafe { libc::geteuid() };
    match user_name(uid) {
        Some(name) => format!("{name} (uid {uid})"),
        None => format!("uid {uid}"),
    }
}

/// The passwd name of `uid`, if any.
fn user_name(uid: libc::uid_t) -> Option<String> {
    let mut buf = vec![0 as libc::c_char; 4096];
    // SAFETY: an all-zero passwd is a valid value of this plain C struct.
    let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
    let mut result: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: every pointer is to a live local of the right type and size;
    // getpwuid_r writes only within `buf` (its length is passed).
    let rc = unsafe { libc::getpwuid_r(uid, &mut pwd, buf.as_mut_ptr(), buf.len(), &mut result) };
    if rc != 0 || result.is_null() || pwd.pw_name.is_null() {
        return None;
    }
    // SAFETY: on success pw_name points to a NUL-terminated string in `buf`.
    let name = unsafe { std::ffi::CStr::from_ptr(pwd.pw_name) };
    Some(name.to_string_lossy().into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(kind: io::ErrorKind, text: &str) -> io::Error {
        io::Error::new(kind, text)
    }

    #[test]
    fn a_low_port_refused_names_the_capability_and_the_ways_out() {
        let addr: SocketAddr = "0.0.0.0:25".parse().unwrap();
        let text = bind_error(
            "listener[0].listen",
            addr,
            &err(io::ErrorKind::PermissionDenied, "Permission denied"),
        );
        assert_eq!(
            text,
            "listener[0].listen: cannot bind 0.0.0.0:25: Permission denied. Fix: ports below 1024 \
             need CAP_NET_BIND_SERVICE: keep the systemd unit's \
             AmbientCapabilities=CAP_NET_BIND_SERVICE line, or give the binary the capability \
             (setcap 'cap_net_bind_service=+ep' /usr/local/bin/oxbridge), or listen on a port of \
             1024 or above (a firewall or load balancer can forward 25 to it)"
        );
        // Above 1024 a refusal is something else (a security module): no
        // capability advice.
        let high: SocketAddr = "0.0.0.0:2525".parse().unwrap();
        let text = bind_error(
            "admin.listen",
            high,
            &err(io::ErrorKind::PermissionDenied, "Permission denied"),
        );
        assert_eq!(
            text,
            "admin.listen: cannot bind 0.0.0.0:2525: Permission denied"
        );
    }

    #[test]
    fn a_port_in_use_and_a_foreign_address_say_where_to_look() {
        let addr: SocketAddr = "127.0.0.1:587".parse().unwrap();
        let text = bind_error(
            "listener[1].listen",
            addr,
            &err(io::ErrorKind::AddrInUse, "Address in use"),
        );
        assert!(text.ends_with("Fix: another program listens there (ss -ltnp 'sport = :587' names it): stop it, or choose another port"), "{text}");
        assert!(in_use_warning("listener[1].listen", addr).starts_with(
            "listener[1].listen: WARNING: 127.0.0.1:587 is in use now: fine if it is this oxbridge's own"
        ));
        let text = bind_error(
            "listener[0].listen",
            addr,
            &err(
                io::ErrorKind::AddrNotAvailable,
                "Cannot assign requested address",
            ),
        );
        assert!(
            text.contains("no interface of this machine has that address"),
            "{text}"
        );
    }

    #[test]
    fn a_directory_refused_says_who_must_own_it() {
        let text = not_writable(
            "state_dir",
            Path::new("/var/lib/oxbridge"),
            "nobody (uid 65534)",
            &err(io::ErrorKind::PermissionDenied, "Permission denied"),
        );
        assert_eq!(
            text,
            "state_dir: /var/lib/oxbridge: not writable by nobody (uid 65534): Permission denied. \
             Fix: the user oxbridge runs as must own it: with the shipped systemd unit, \
             StateDirectory=oxbridge gives the service /var/lib/oxbridge (keep state_dir and the \
             spool there); otherwise `chown -R USER: /var/lib/oxbridge` for the user that runs \
             oxbridge (and run `oxbridge check` as that user)"
        );
    }

    #[test]
    fn the_user_has_a_name_and_a_uid() {
        // SAFETY: as in `user`.
        let uid = unsafe { libc::geteuid() };
        let me = user();
        assert!(
            me.ends_with(&format!("uid {uid})")) || me == format!("uid {uid}"),
            "{me}"
        );
        assert_eq!(user_name(0).as_deref(), Some("root"));
    }
}
