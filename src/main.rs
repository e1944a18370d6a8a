//! The `oxbridge` command: argument parsing, logging, signals. Everything
//! else lives in the library.

use std::io::{IsTerminal, Read};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use secrecy::SecretString;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::info;

use oxbridge::config::{self, provider, Config, Grant, LogFormat, ProviderKind};
use oxbridge::oauth::consent;
use oxbridge::Event;

/// Keeps password-only mail clients working against OAuth-only mail servers.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve every listener in the config until SIGINT/SIGTERM, then drain.
    Run {
        /// Config file [default: $OXBRIDGE_CONFIG, ./oxbridge.toml, /etc/oxbridge/oxbridge.toml]
        #[arg(long, env = "OXBRIDGE_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Interactive consent for a `refresh_token` account; stores its refresh token.
    Login {
        /// The account's `login` as written in the config.
        account: String,
        #[arg(long, env = "OXBRIDGE_CONFIG")]
        config: Option<PathBuf>,
        /// Authorization code with PKCE on a loopback redirect, instead of the device code flow.
        #[arg(long)]
        browser: bool,
        /// With --browser: the loopback port for the redirect (default: any free port).
        #[arg(long, default_value_t = 0, requires = "browser")]
        port: u16,
        /// Authorization code with PKCE where device code is blocked and no
        /// browser reaches this host: open the printed URL anywhere, then
        /// paste back the address the browser was sent to.
        #[arg(long, conflicts_with = "browser")]
        paste: bool,
        /// With --paste: the redirect URI registered for the app (default:
        /// the cloud's https://login.../common/oauth2/nativeclient).
        #[arg(long, requires = "paste")]
        redirect_uri: Option<String>,
    },
    /// Read a password from stdin and print its Argon2id hash for `password_hash`.
    HashPassword,
    /// Validate the config, then per account and protocol fetch a token and
    /// log in upstream; one line each, OK or what to fix.
    Check {
        #[arg(long, env = "OXBRIDGE_CONFIG")]
        config: Option<PathBuf>,
        /// Only the config and what `run` loads from this machine
        /// (certificates, keys, directories, ports); no token request, no
        /// upstream login.
        #[arg(long)]
        offline: bool,
        /// With --send-to: the account (its `login` in the config) to send as.
        #[arg(requires = "send_to")]
        account: Option<String>,
        /// Send a short test message as ACCOUNT's mailbox to ADDRESS through
        /// the real path (SMTP, or Microsoft Graph), and say where it went.
        #[arg(
            long,
            value_name = "ADDRESS",
            requires = "account",
            conflicts_with = "offline"
        )]
        send_to: Option<String>,
    },
    /// The SMTP spool: what waits, why, and what to do with it.
    Queue {
        #[command(subcommand)]
        action: QueueCommand,
        #[arg(long, env = "OXBRIDGE_CONFIG", global = true)]
        config: Option<PathBuf>,
    },
    /// Exit 0 if the running server's `/healthz` answers (for container
    /// health checks, where there is no curl).
    Healthcheck {
        #[arg(long, env = "OXBRIDGE_CONFIG")]
        config: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum QueueCommand {
    /// Every waiting message and dead letter, one line each.
    List,
    /// One message: envelope, attempts, last error, headers.
    Show { id: String },
    /// Try a message now (a dead letter goes back to the queue), or all.
    Retry {
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        id: Option<String>,
        #[arg(long)]
        all: bool,
    },
    /// Remove a message without delivering it; its sender is not told.
    Drop { id: String },
}

/// Exit status for a runtime failure.
const EXIT_RUNTIME: u8 = 1;
/// Exit status for a usage or configuration error.
const EXIT_CONFIG: u8 = 2;

/// The config file, or exit status 2 with the error (file, key) printed.
fn load_config(path: &std::path::Path) -> Result<Config, ExitCode> {
    Config::load(path).map_err(|e| {
        eprintln!("oxbridge: config error: {e}");
        ExitCode::from(EXIT_CONFIG)
    })
}

/// A multi-threaded tokio runtime, or exit status 1.
fn runtime() -> Result<tokio::runtime::Runtime, ExitCode> {
    tokio::runtime::Runtime::new().map_err(|e| {
        eprintln!("oxbridge: cannot start the runtime: {e}");
        ExitCode::from(EXIT_RUNTIME)
    })
}

/// Allocations at least this large are mapped (and unmapped when freed),
/// whatever glibc's adaptive threshold would say.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const MMAP_THRESHOLD: libc::c_int = 128 * 1024;

fn main() -> ExitCode {
    // Each Argon2 check allocates ~19 MiB. With glibc's adaptive mmap
    // threshold, the first free raises the threshold and later buffers come
    // from the heap and stay resident (measured: 9 MiB -> 125-220 MiB RSS
    // after 10-20 first-time logins). A fixed threshold returns them.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets an allocator parameter; called before any
    // other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
    }
    let cli = Cli::parse();
    match cli.command {
        Command::Run { config } => run(config::resolve_path(config)),
        Command::Login {
            account,
            config,
            browser,
            port,
            paste,
            redirect_uri,
        } => {
            let flow = if browser {
                Flow::Browser(port)
            } else if paste {
                Flow::Paste(redirect_uri)
            } else {
                Flow::DeviceCode
            };
            login(config::resolve_path(config), &account, flow)
        }
        Command::HashPassword => hash_password(),
        Command::Check {
            config,
            offline,
            account,
            send_to,
        } => match account.zip(send_to) {
            Some((account, to)) => check_send(config::resolve_path(config), &account, &to),
            None => check(config::resolve_path(config), offline),
        },
        Command::Healthcheck { config } => healthcheck(config::resolve_path(config)),
        Command::Queue { action, config } => queue(config::resolve_path(config), action),
    }
}

/// `oxbridge queue`: print what was asked for; exit 1 on failure.
fn queue(path: PathBuf, action: QueueCommand) -> ExitCode {
    let config = match load_config(&path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let action = match action {
        QueueCommand::List => oxbridge::QueueAction::List,
        QueueCommand::Show { id } => oxbridge::QueueAction::Show(id),
        QueueCommand::Retry { all: true, .. } => oxbridge::QueueAction::RetryAll,
        QueueCommand::Retry { id, .. } => oxbridge::QueueAction::Retry(id.unwrap_or_default()),
        QueueCommand::Drop { id } => oxbridge::QueueAction::Drop(id),
    };
    match oxbridge::queue(&config, action) {
        Ok(text) => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("oxbridge queue: {e}");
            ExitCode::from(EXIT_RUNTIME)
        }
    }
}

/// `oxbridge check`: exit 0 when every line is OK.
fn check(path: PathBuf, offline: bool) -> ExitCode {
    let config = match load_config(&path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    println!("{}: configuration OK", path.display());
    for warning in oxbridge::check::warnings(&config) {
        println!("{warning}");
    }
    if !preflight(&config, true) {
        return ExitCode::from(EXIT_CONFIG);
    }
    if offline {
        return ExitCode::SUCCESS;
    }
    let runtime = match runtime() {
        Ok(r) => r,
        Err(code) => return code,
    };
    let mut out = std::io::stdout();
    match runtime.block_on(oxbridge::check::run(config, &mut out)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(EXIT_RUNTIME),
        Err(e) => {
            eprintln!("oxbridge: {e}");
            ExitCode::from(EXIT_RUNTIME)
        }
    }
}

/// What `run` will load from this machine (`oxbridge::preflight`): its
/// lines on stdout if `checking`, each failure on stderr; `true` if none.
/// An address not available now counts for `check` only: `run` binds
/// for real and exits 1, so that systemd tries again.
fn preflight(config: &Config, checking: bool) -> bool {
    let found = oxbridge::preflight(config);
    if checking {
        for line in &found.lines {
            println!("{line}");
        }
    }
    let unavailable = found.unavailable.iter().filter(|_| checking);
    for failure in found.failures.iter().chain(unavailable.clone()) {
        tracing::error!(error = %failure, "cannot start");
        eprintln!("oxbridge: {failure}");
    }
    found.failures.is_empty() && unavailable.count() == 0
}

/// `oxbridge check ACCOUNT --send-to ADDRESS`: exit 0 when the message
/// went out, 1 when it failed, 2 when it cannot be sent this way.
fn check_send(path: PathBuf, account: &str, to: &str) -> ExitCode {
    use oxbridge::check::SendError;
    let config = match load_config(&path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let runtime = match runtime() {
        Ok(r) => r,
        Err(code) => return code,
    };
    let mut out = std::io::stdout();
    match runtime.block_on(oxbridge::check::send_to(config, account, to, &mut out)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(EXIT_RUNTIME),
        Err(SendError::Usage(e)) => {
            eprintln!("oxbridge: {}: {e}", path.display());
            ExitCode::from(EXIT_CONFIG)
        }
        Err(SendError::Runtime(e)) => {
            eprintln!("oxbridge: {e}");
            ExitCode::from(EXIT_RUNTIME)
        }
    }
}

/// `oxbridge healthcheck`: GET /healthz on `[admin] listen`. Every failure
/// exits 1 (container runtimes reserve 2).
fn healthcheck(path: PathBuf) -> ExitCode {
    let config = match Config::load(&path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("oxbridge: config error: {e}");
            return ExitCode::from(EXIT_RUNTIME);
        }
    };
    let Some(admin) = config.admin else {
        eprintln!("oxbridge: {}: no [admin] listen to check", path.display());
        return ExitCode::from(EXIT_RUNTIME);
    };
    let mut address = admin.listen;
    if address.ip().is_unspecified() {
        address.set_ip(match address {
            std::net::SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            std::net::SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    match oxbridge::admin::probe_health(address) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("oxbridge: unhealthy: {e}");
            ExitCode::from(EXIT_RUNTIME)
        }
    }
}

/// How `oxbridge login` asks for consent.
enum Flow {
    DeviceCode,
    /// The loopback port (0: any).
    Browser(u16),
    /// The redirect URI, if not the cloud's default.
    Paste(Option<String>),
}

/// `oxbridge login`: consent, then the refresh token into the store.
fn login(path: PathBuf, account: &str, flow: Flow) -> ExitCode {
    let config = match load_config(&path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let Some(entry) = config
        .accounts
        .iter()
        .find(|a| a.login.eq_ignore_ascii_case(account))
    else {
        eprintln!(
            "oxbridge: {}: no [[account]] has login {account:?}",
            path.display()
        );
        return ExitCode::from(EXIT_CONFIG);
    };
    if entry.grant != Grant::RefreshToken {
        eprintln!(
            "oxbridge: {}: account {account:?} has grant = \"{}\"; `oxbridge login` is for grant = \"refresh_token\"",
            path.display(),
            entry.grant
        );
        return ExitCode::from(EXIT_CONFIG);
    }
    // With backend = "redis" the token goes to Redis, else to state_dir.
    let state = match oxbridge::State::open(&config) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("oxbridge: {e}");
            return ExitCode::from(EXIT_RUNTIME);
        }
    };
    let providers = config.providers();
    let Some(provider) = provider::find(&providers, entry.provider.as_deref()) else {
        eprintln!(
            "oxbridge: {}: account {account:?}: unknown provider",
            path.display()
        );
        return ExitCode::from(EXIT_CONFIG);
    };
    if provider.kind == ProviderKind::Google && matches!(flow, Flow::DeviceCode) {
        eprintln!("oxbridge: {}", consent::GOOGLE_NO_DEVICE_FLOW);
        return ExitCode::from(EXIT_CONFIG);
    }
    let request = consent::Request {
        provider,
        protocols: config.protocols(),
        account: &entry.login,
        mailbox: entry.mailbox.as_deref().unwrap_or(&entry.login),
        ca_file: config.upstream.ca_file.as_deref(),
    };
    let runtime = match runtime() {
        Ok(r) => r,
        Err(code) => return code,
    };
    let mut out = std::io::stdout();
    let result = runtime.block_on(async {
        let token = match flow {
            Flow::Browser(port) => consent::browser_flow(&request, port, &mut out).await,
            Flow::Paste(redirect) => {
                let redirect = redirect.unwrap_or_else(|| consent::paste_redirect(provider));
                let mut input = std::io::BufReader::new(std::io::stdin());
                consent::paste_flow(&request, &redirect, &mut input, &mut out).await
            }
            Flow::DeviceCode => consent::device_flow(&request, &mut out).await,
        }?;
        state
            .save_refresh(&provider.store_key(&entry.login), &token)
            .await
            .map_err(|e| e.to_string())?;
        state
            .note(&provider.store_key(&entry.login), Event::Consented)
            .await;
        Ok::<(), String>(())
    });
    match result {
        Ok(()) => {
            println!(
                "Stored the refresh token for {} in {}.",
                entry.login,
                state.location()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("oxbridge: login for {account} failed: {e}");
            ExitCode::from(EXIT_RUNTIME)
        }
    }
}

/// The log filter when RUST_LOG is not set: oxbridge at `level`, libraries
/// at warn. rustls only at error: it warns about what TLS clients do wrong
/// that is no concern of the operator's (GnuTLS clients such as msmtp send
/// an IP address as SNI, and rustls warns "Illegal SNI" on each connection);
/// a handshake that fails is logged by oxbridge itself.
fn default_filter(level: &str) -> String {
    format!("warn,rustls=error,oxbridge={level}")
}

fn init_logging(config: &Config) {
    // `log.level` is oxbridge's own; libraries (TLS, HTTP) stay at warn so
    // that debug logs show sessions, not handshakes. RUST_LOG overrides all.
    let level = config.log.level.to_ascii_lowercase();
    let from_env = tracing_subscriber::EnvFilter::try_from_default_env().ok();
    let own_level_only = from_env.is_none();
    let filter =
        from_env.unwrap_or_else(|| tracing_subscriber::EnvFilter::new(default_filter(&level)));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match config.log.format {
        LogFormat::Json => builder.json().flatten_event(true).init(),
        LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal()).init(),
    }
    if own_level_only {
        // Libraries that log through the `log` crate (rustls, reqwest) are
        // not reached by the target filter above: cap them at the source.
        log::set_max_level(log::LevelFilter::Warn);
    }
}

fn run(path: PathBuf) -> ExitCode {
    let config = match load_config(&path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    init_logging(&config);
    // What would fail at start fails here, with exit status 2 (a config
    // error: systemd does not restart it) and the same fix as `check`.
    if !preflight(&config, false) {
        return ExitCode::from(EXIT_CONFIG);
    }
    let runtime = match runtime() {
        Ok(r) => r,
        Err(code) => return code,
    };
    runtime.block_on(async move {
        let control = oxbridge::Control {
            config_path: path.clone(),
            shutdown: CancellationToken::new(),
            reload: Arc::new(Notify::new()),
        };
        if let Err(e) = handle_signals(control.shutdown.clone(), control.reload.clone()) {
            eprintln!("oxbridge: cannot handle signals: {e}");
            return ExitCode::from(EXIT_RUNTIME);
        }
        info!(config = %path.display(), version = env!("CARGO_PKG_VERSION"), "oxbridge starting");
        match oxbridge::run(config, control).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                tracing::error!(error = %e, "cannot start");
                eprintln!("oxbridge: {e}");
                ExitCode::from(EXIT_RUNTIME)
            }
        }
    })
}

/// SIGINT/SIGTERM cancel `shutdown`; SIGHUP asks for a reload.
fn handle_signals(shutdown: CancellationToken, reload: Arc<Notify>) -> std::io::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = int.recv() => break,
                _ = term.recv() => break,
                _ = hup.recv() => {
                    info!("SIGHUP: reloading accounts and certificates");
                    reload.notify_one();
                }
            }
        }
        info!("signal received");
        shutdown.cancel();
    });
    Ok(())
}

fn hash_password() -> ExitCode {
    let password = if std::io::stdin().is_terminal() {
        match rpassword::prompt_password("Password: ") {
            Ok(p) => p,
            Err(e) => {
                eprintln!("oxbridge: cannot read the password: {e}");
                return ExitCode::from(EXIT_RUNTIME);
            }
        }
    } else {
        let mut s = String::new();
        if let Err(e) = std::io::stdin().take(64 * 1024).read_to_string(&mut s) {
            eprintln!("oxbridge: cannot read the password: {e}");
            return ExitCode::from(EXIT_RUNTIME);
        }
        s.strip_suffix('\n')
            .map(|p| p.strip_suffix('\r').unwrap_or(p))
            .unwrap_or(&s)
            .to_string()
    };
    if password.is_empty() {
        eprintln!("oxbridge: empty password");
        return ExitCode::from(EXIT_CONFIG);
    }
    match oxbridge::hash_password(&SecretString::from(password)) {
        Ok(hash) => {
            println!("{hash}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("oxbridge: {e}");
            ExitCode::from(EXIT_RUNTIME)
        }
    }
}
