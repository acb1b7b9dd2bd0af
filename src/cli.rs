//! The command line: `taproom serve`, `token`, and the operations commands (`check-config`,
//! `backup`, `restore`, `export-all`, `import`), with config resolved the same way for all of
//! them (file, then environment, then flags).
//!
//! Exit codes: 0 success, 1 an operation failed, 2 bad configuration or arguments.

use crate::auth::Authenticator;
use crate::config::{Config, ConfigError, Overrides};
use clap::{Parser, Subcommand};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

/// Taproom: a character-chat gateway beside NextChat.
#[derive(Debug, Parser)]
#[command(name = "taproom", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

/// Options every subcommand that reads config accepts.
#[derive(Debug, Clone, clap::Args)]
pub struct ConfigArgs {
    /// Config file (TOML); built-in defaults when absent.
    #[arg(long, env = "TAPROOM_CONFIG")]
    pub config: Option<PathBuf>,
    /// Data directory (overrides config and TAPROOM_DATA_DIR).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the gateway.
    Serve {
        #[command(flatten)]
        config: ConfigArgs,
        /// Listen address, e.g. 127.0.0.1:8787.
        #[arg(long)]
        listen: Option<SocketAddr>,
    },
    /// Print a signed JWT for a user.
    Token {
        #[command(flatten)]
        config: ConfigArgs,
        /// The user id (`sub` claim).
        #[arg(long)]
        sub: String,
        /// Grant admin rights (`role: "admin"`).
        #[arg(long)]
        admin: bool,
        /// Lifetime, e.g. 24h, 30m, 7d.
        #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
        ttl: std::time::Duration,
    },
    /// Load and validate the config (and TLS files), then print it with secrets masked.
    CheckConfig {
        #[command(flatten)]
        config: ConfigArgs,
    },
    /// Write a consistent snapshot of the database to a new file. With a server running, it is
    /// asked for the snapshot over HTTP (admin token minted from the configured secret).
    Backup {
        #[command(flatten)]
        config: ConfigArgs,
        /// The backup file to create (must not exist).
        #[arg(long)]
        out: PathBuf,
        /// Base URL of the running server; default derived from `listen` and `[tls]`.
        #[arg(long)]
        url: Option<String>,
    },
    /// Replace the database with a backup (the server must be stopped); the old file is kept
    /// as `taproom.redb.bak`.
    Restore {
        #[command(flatten)]
        config: ConfigArgs,
        /// A file written by `taproom backup`.
        file: PathBuf,
    },
    /// Export one user's characters and chats (SillyTavern JSONL) into a directory (the server
    /// must be stopped).
    ExportAll {
        #[command(flatten)]
        config: ConfigArgs,
        /// The user id (`sub`).
        #[arg(long)]
        user: String,
        /// Target directory (created if missing).
        dir: PathBuf,
    },
    /// Import card files (PNG, JSON, CharX; files or directories) for `--user`, or a directory
    /// written by `export-all` (holding `manifest.json`). The server must be stopped.
    Import {
        #[command(flatten)]
        config: ConfigArgs,
        /// Owner of imported cards (required for card files).
        #[arg(long)]
        user: Option<String>,
        /// Card files or directories, or one `export-all` directory.
        #[arg(required = true)]
        paths: Vec<PathBuf>,
    },
}

fn load(args: &ConfigArgs, listen: Option<SocketAddr>) -> Result<Config, ConfigError> {
    let env: HashMap<String, String> = std::env::vars().collect();
    Config::load(
        args.config.as_deref(),
        &env,
        &Overrides {
            listen,
            data_dir: args.data_dir.clone(),
        },
    )
}

/// Logs to stderr with the given filter (falls back to `info`).
pub fn init_logging(filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

/// Runs the parsed command line; the exit code is 2 for configuration errors.
pub fn run(cli: Cli) -> ExitCode {
    match cli.command {
        Command::Serve { config, listen } => {
            let config = match load(&config, listen) {
                Ok(c) => c,
                Err(e) => return config_error(e),
            };
            init_logging(&config.log);
            serve(config)
        }
        Command::Token {
            config,
            sub,
            admin,
            ttl,
        } => {
            let config = match load(&config, None) {
                Ok(c) => c,
                Err(e) => return config_error(e),
            };
            let auth = match Authenticator::from_config(&config.auth, &config.data_dir) {
                Ok(a) => a,
                Err(e) => return config_error(e),
            };
            match auth.mint(&sub, admin, ttl) {
                Ok(token) => {
                    println!("{token}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("taproom: {e}");
                    ExitCode::from(2)
                }
            }
        }
        Command::CheckConfig { config } => match load(&config, None) {
            Ok(c) => crate::ops::check_config(&c),
            Err(e) => config_error(e),
        },
        Command::Backup { config, out, url } => match load(&config, None) {
            Ok(c) => crate::ops::backup(&c, &out, url.as_deref()),
            Err(e) => config_error(e),
        },
        Command::Restore { config, file } => match load(&config, None) {
            Ok(c) => crate::ops::restore(&c, &file),
            Err(e) => config_error(e),
        },
        Command::ExportAll { config, user, dir } => match load(&config, None) {
            Ok(c) => crate::ops::export_all(c, &user, &dir),
            Err(e) => config_error(e),
        },
        Command::Import {
            config,
            user,
            paths,
        } => match load(&config, None) {
            Ok(c) => match (paths.as_slice(), user) {
                ([dir], _) if dir.join("manifest.json").is_file() => crate::ops::import(c, dir),
                (_, Some(user)) => crate::ops::import_cards(c, &user, &paths),
                (_, None) => {
                    eprintln!("taproom: importing card files needs --user SUB (the owner)");
                    ExitCode::from(2)
                }
            },
            Err(e) => config_error(e),
        },
    }
}

/// Prints a config error and returns exit code 2.
pub fn config_error(e: ConfigError) -> ExitCode {
    eprintln!("taproom: config error: {e}");
    ExitCode::from(2)
}

fn serve(config: Config) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("taproom: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        let listen = config.listen;
        let data_dir = config.data_dir.clone();
        let state = match crate::server::build_state(config) {
            Ok(s) => s,
            Err(crate::server::StartError::Config(e)) => return config_error(e),
            Err(e) => {
                eprintln!("taproom: {e}");
                return ExitCode::FAILURE;
            }
        };
        let tls = match crate::tls::Tls::from_config(&state.config.tls) {
            Ok(t) => t,
            Err(e) => {
                eprintln!("taproom: config error: {e}");
                return ExitCode::from(2);
            }
        };
        let redirect_addr = state.config.tls.redirect_http;
        let listener = match tokio::net::TcpListener::bind(listen).await {
            Ok(l) => l,
            Err(e) => {
                eprintln!("taproom: cannot listen on {listen}: {e}");
                return ExitCode::FAILURE;
            }
        };
        let local = listener.local_addr().ok();
        let redirect = match redirect_addr {
            Some(addr) => match tokio::net::TcpListener::bind(addr).await {
                Ok(l) => Some(l),
                Err(e) => {
                    eprintln!("taproom: cannot listen on {addr} (tls.redirect_http): {e}");
                    return ExitCode::FAILURE;
                }
            },
            None => None,
        };
        let shown = local.map(|a| a.to_string()).unwrap_or_default();
        let redirect_shown = redirect
            .as_ref()
            .and_then(|l| l.local_addr().ok())
            .map(|a| a.to_string())
            .unwrap_or_default();
        let scheme = if tls.is_some() { "https" } else { "http" };
        // One line, `listen=` first: the test harness reads the bound address from it.
        tracing::info!(listen = %shown, scheme, http_redirect = %redirect_shown, data_dir = %data_dir.display(), "taproom listening");
        // Both listeners stop on the same signal.
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            crate::server::shutdown_signal().await;
            let _ = stop_tx.send(true);
        });
        let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
            let _ = rx.wait_for(|s| *s).await;
        };
        let redirect_task = redirect.map(|l| {
            let port = local.map(|a| a.port()).unwrap_or(443);
            tokio::spawn(crate::server::run_redirect(l, port, stopped(stop_rx.clone())))
        });
        let result = match tls {
            Some(tls) => crate::server::run_tls(listener, state, tls, stopped(stop_rx)).await,
            None => crate::server::run(listener, state, stopped(stop_rx)).await,
        };
        if let Some(task) = redirect_task {
            let _ = task.await;
        }
        match result {
            Ok(()) => {
                tracing::info!("stopped");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("taproom: server error: {e}");
                ExitCode::FAILURE
            }
        }
    })
}
