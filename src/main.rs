//! The `komilion` binary: the command line over the library.

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use komilion::catalog::{import_litellm, CatalogFile, EMBEDDED_CATALOG};
use komilion::config::Config;
use komilion::mock_provider::{Behavior, MockConfig, MockProvider};
use std::net::SocketAddr;
use std::path::PathBuf;

#[derive(Parser)]
#[command(name = "komilion", version, about = "An LLM gateway on Pingora")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway. Pingora's -d (daemon), -u (upgrade) and -t (test) keep their meaning.
    Serve {
        #[command(flatten)]
        opt: pingora::server::configuration::Opt,
    },
    /// Validate a config file and list every error with its path.
    Check {
        #[arg(short, long)]
        conf: PathBuf,
    },
    /// Run the gateway with a demo key in front of the simulated provider. No network needed.
    Demo {
        /// Print one JSON line (base_url, api_key, metrics_url, ...) once ready.
        #[arg(long)]
        json: bool,
        #[arg(long)]
        port: Option<u16>,
        #[arg(long)]
        metrics_port: Option<u16>,
        /// Pace the simulated stream (milliseconds between chunks).
        #[arg(long, default_value_t = 0)]
        chunk_delay_ms: u64,
    },
    /// Run the simulated LLM provider on its own.
    MockProvider {
        #[arg(long, default_value_t = 8000)]
        port: u16,
        #[arg(long, default_value = "127.0.0.1")]
        host: String,
        /// Require this key (`Authorization: Bearer ...`).
        #[arg(long)]
        api_key: Option<String>,
        /// Default behaviour as JSON, e.g. '{"ttfb_ms": 50, "chunks": 20}'.
        #[arg(long)]
        behavior: Option<String>,
        #[arg(long, default_value_t = 1)]
        threads: usize,
    },
    /// Manage the model catalog.
    Catalog {
        #[command(subcommand)]
        command: CatalogCommand,
    },
}

#[derive(Subcommand)]
enum CatalogCommand {
    /// Refresh prices and limits from LiteLLM's model_prices_and_context_window.json.
    ImportLitellm {
        /// LiteLLM's JSON file.
        file: PathBuf,
        /// The catalog to refresh (the embedded one when absent).
        #[arg(long)]
        catalog: Option<PathBuf>,
        /// Where to write the result (stdout when absent).
        #[arg(long)]
        output: Option<PathBuf>,
    },
}

fn init_logging(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve { opt } => {
            init_logging("info");
            let Some(path) = opt.conf.clone() else {
                bail!("komilion serve needs a config file: -c FILE");
            };
            let config = Config::load(path.as_ref()).map_err(|e| anyhow::anyhow!("{path}: {e}"))?;
            let server = komilion::server::build_server(&config, opt)?;
            server.run_forever()
        }
        Command::Check { conf } => {
            let config =
                Config::load(&conf).map_err(|e| anyhow::anyhow!("{}: {e}", conf.display()))?;
            komilion::server::build_chain(
                &config,
                &komilion_plugins::builtin_registry(),
                &Default::default(),
            )
            .map_err(|e| anyhow::anyhow!("{}: {e}", conf.display()))?;
            println!("{}: ok", conf.display());
            Ok(())
        }
        Command::Demo {
            json,
            port,
            metrics_port,
            chunk_delay_ms,
        } => {
            init_logging("warn");
            komilion::demo::run(komilion::demo::DemoOptions {
                json,
                port,
                metrics_port,
                chunk_delay_ms,
            })?;
            Ok(())
        }
        Command::MockProvider {
            port,
            host,
            api_key,
            behavior,
            threads,
        } => {
            init_logging("info");
            let behavior: Behavior = match behavior {
                Some(json) => serde_json::from_str(&json).context("--behavior")?,
                None => Behavior::default(),
            };
            let addr: SocketAddr = format!("{host}:{port}").parse().context("--host/--port")?;
            let provider = MockProvider::start_in_thread(
                MockConfig {
                    api_key,
                    behavior,
                    ..MockConfig::default()
                },
                addr,
                threads,
            )?;
            eprintln!("simulated provider on {}", provider.base_url());
            loop {
                std::thread::park();
            }
        }
        Command::Catalog {
            command:
                CatalogCommand::ImportLitellm {
                    file,
                    catalog,
                    output,
                },
        } => {
            let current = match &catalog {
                Some(path) => {
                    std::fs::read_to_string(path).with_context(|| path.display().to_string())?
                }
                None => EMBEDDED_CATALOG.to_owned(),
            };
            let mut catalog_file: CatalogFile =
                serde_yaml::from_str(&current).context("reading the catalog")?;
            let litellm =
                std::fs::read_to_string(&file).with_context(|| file.display().to_string())?;
            let missing =
                import_litellm(&mut catalog_file, &litellm).map_err(anyhow::Error::msg)?;
            for id in &missing {
                eprintln!("warning: {id} is not in {}; kept as it was", file.display());
            }
            catalog_file.source = Some(format!(
                "LiteLLM model_prices_and_context_window.json (MIT), imported by `komilion catalog import-litellm` from {}",
                file.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
            ));
            // Check that the result loads before writing it anywhere.
            komilion::catalog::Catalog::from_file(catalog_file.clone())
                .map_err(|issues| anyhow::anyhow!("the imported catalog is invalid: {issues:?}"))?;
            let yaml = serde_yaml::to_string(&catalog_file)?;
            match output {
                Some(path) => {
                    std::fs::write(&path, yaml).with_context(|| path.display().to_string())?
                }
                None => print!("{yaml}"),
            }
            Ok(())
        }
    }
}
