//! The command line: `taproom serve` and `taproom token`, with config resolved the same way for
//! both (file, then environment, then flags).

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

fn init_logging(filter: &str) {
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
    }
}

fn config_error(e: ConfigError) -> ExitCode {
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
        let listener = match tokio::net::TcpListener::bind(listen).await {
            Ok(l) => l,
            Err(e) => {
                eprintln!("taproom: cannot listen on {listen}: {e}");
                return ExitCode::FAILURE;
            }
        };
        let local = listener
            .local_addr()
            .map(|a| a.to_string())
            .unwrap_or_default();
        tracing::info!(listen = %local, data_dir = %data_dir.display(), "taproom listening");
        match crate::server::run(listener, state, crate::server::shutdown_signal()).await {
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
