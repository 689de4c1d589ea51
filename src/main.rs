//! The `komilion` binary: the command line over the library.

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use komilion::catalog::{import_litellm, CatalogFile, EMBEDDED_CATALOG};
use komilion::config::Config;
use komilion::mock_provider::{Behavior, MockConfig, MockProvider};
use komilion::store::cache::StoreCache;
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
        #[arg(long)]
        admin_port: Option<u16>,
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
    /// Accounts, keys, wallets and provider keys, directly against the configured store (the
    /// same operations as the admin API).
    Admin {
        /// The gateway's config file (its `store:` is used).
        #[arg(short, long, conflicts_with = "store")]
        conf: Option<PathBuf>,
        /// A store URL instead of a config file.
        #[arg(long)]
        store: Option<String>,
        #[command(subcommand)]
        command: AdminCommand,
    },
}

#[derive(Subcommand)]
enum AdminCommand {
    #[command(subcommand)]
    Accounts(AccountsCommand),
    #[command(subcommand)]
    Keys(KeysCommand),
    #[command(subcommand)]
    Wallet(WalletCommand),
    /// Provider keys accounts bring (sealed with KOMILION_MASTER_KEY).
    #[command(subcommand)]
    ProviderKeys(ProviderKeysCommand),
    /// Print a new random master key (base64) for KOMILION_MASTER_KEY(S).
    NewMasterKey,
    /// Re-seal every provider key with the first key of KOMILION_MASTER_KEYS (rotation).
    ResealProviderKeys,
}

#[derive(Subcommand)]
enum AccountsCommand {
    Create {
        #[arg(long)]
        name: String,
        #[arg(long)]
        email: String,
    },
    List {
        #[arg(long, default_value_t = 100)]
        limit: u32,
        #[arg(long)]
        after: Option<String>,
    },
    Get {
        id: String,
    },
    Disable {
        id: String,
    },
    Enable {
        id: String,
    },
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Create a key; its secret is printed once.
    Create {
        account: String,
        #[arg(long)]
        name: String,
        /// Comma-separated models the key may use (all when absent).
        #[arg(long, value_delimiter = ',')]
        models: Vec<String>,
        #[arg(long)]
        rpm: Option<u32>,
        #[arg(long)]
        tpm: Option<u32>,
        /// RFC 3339 time, e.g. 2027-01-01T00:00:00Z.
        #[arg(long)]
        expires_at: Option<chrono::DateTime<chrono::Utc>>,
        /// Expected spend (decimal USD); alerts fire at a share of it.
        #[arg(long)]
        budget_usd: Option<String>,
    },
    List {
        account: String,
    },
    Revoke {
        key_id: String,
    },
}

#[derive(Subcommand)]
enum WalletCommand {
    Get {
        account: String,
    },
    Topup {
        account: String,
        /// A decimal amount, e.g. 12.50.
        #[arg(long)]
        amount_usd: String,
        /// Makes a retried top-up a no-op.
        #[arg(long)]
        idempotency_key: Option<String>,
    },
}

#[derive(Subcommand)]
enum ProviderKeysCommand {
    /// Seal and store a provider key read from standard input.
    Set {
        account: String,
        provider: String,
    },
    List {
        account: String,
    },
    Delete {
        account: String,
        provider: String,
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

/// Run one `komilion admin` command and print its JSON.
async fn admin(url: &str, command: AdminCommand) -> anyhow::Result<()> {
    use komilion::admin::ops;
    if let AdminCommand::NewMasterKey = command {
        println!("{}", komilion::secrets::generate_master_key());
        return Ok(());
    }
    let store = komilion::store::open(url)
        .await
        .map_err(|e| anyhow::anyhow!("cannot open the store {}: {e}", komilion::server::redacted(url)))?;
    let store = store.as_ref();
    let done = serde_json::json!({"ok": true});
    let result = match command {
        AdminCommand::Accounts(AccountsCommand::Create { name, email }) => {
            ops::create_account(store, ops::CreateAccount { name, email }).await
        }
        AdminCommand::Accounts(AccountsCommand::List { limit, after }) => {
            ops::list_accounts(store, limit, after.as_deref()).await
        }
        AdminCommand::Accounts(AccountsCommand::Get { id }) => ops::get_account(store, &id).await,
        AdminCommand::Accounts(AccountsCommand::Disable { id }) => {
            ops::update_account(
                store,
                &id,
                ops::UpdateAccount {
                    status: "disabled".into(),
                },
            )
            .await
        }
        AdminCommand::Accounts(AccountsCommand::Enable { id }) => {
            ops::update_account(
                store,
                &id,
                ops::UpdateAccount {
                    status: "active".into(),
                },
            )
            .await
        }
        AdminCommand::Keys(KeysCommand::Create {
            account,
            name,
            models,
            rpm,
            tpm,
            expires_at,
            budget_usd,
        }) => {
            let body = ops::CreateKey {
                name,
                expires_at,
                allowed_models: models,
                rpm_limit: rpm,
                tpm_limit: tpm,
                budget_usd,
            };
            ops::create_key(store, &account, body).await
        }
        AdminCommand::Keys(KeysCommand::List { account }) => ops::list_keys(store, &account).await,
        AdminCommand::Keys(KeysCommand::Revoke { key_id }) => ops::revoke_key(store, &key_id).await.map(|_| done),
        AdminCommand::Wallet(WalletCommand::Get { account }) => ops::wallet(store, &account).await,
        AdminCommand::Wallet(WalletCommand::Topup {
            account,
            amount_usd,
            idempotency_key,
        }) => ops::top_up(store, &account, ops::TopUp { amount_usd }, idempotency_key.as_deref()).await,
        AdminCommand::ProviderKeys(ProviderKeysCommand::Set { account, provider }) => {
            let mut api_key = String::new();
            std::io::Read::read_to_string(&mut std::io::stdin(), &mut api_key)?;
            let keys = komilion::secrets::MasterKeys::from_env()?;
            ops::put_provider_key(
                store,
                keys.as_ref(),
                &account,
                &provider,
                ops::PutProviderKey { api_key },
            )
            .await
            .map(|_| done)
        }
        AdminCommand::ProviderKeys(ProviderKeysCommand::List { account }) => {
            ops::list_provider_keys(store, &account).await
        }
        AdminCommand::ProviderKeys(ProviderKeysCommand::Delete { account, provider }) => {
            ops::delete_provider_key(store, &account, &provider).await.map(|_| done)
        }
        AdminCommand::ResealProviderKeys => {
            let keys = komilion::secrets::MasterKeys::from_env()?
                .ok_or_else(|| anyhow::anyhow!("set KOMILION_MASTER_KEYS=new:<base64>,old:<base64>"))?;
            ops::reseal_provider_keys(store, &keys).await
        }
        AdminCommand::NewMasterKey => unreachable!("handled above"),
    };
    match result {
        Ok(value) => {
            println!("{}", serde_json::to_string_pretty(&value)?);
            Ok(())
        }
        Err(e) => bail!("{} ({})", e, e.code()),
    }
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
            let config = Config::load(&conf).map_err(|e| anyhow::anyhow!("{}: {e}", conf.display()))?;
            // A store that is never opened: plugins that need one see that there is one.
            let cache = config.store.as_ref().map(|_| StoreCache::new(Default::default()));
            let services = komilion::server::plugin_services(cache.as_ref());
            komilion::server::build_chain(&config, &komilion_plugins::builtin_registry(), &services)
                .map_err(|e| anyhow::anyhow!("{}: {e}", conf.display()))?;
            let warnings = komilion::server::config_warnings(&config);
            for warning in &warnings {
                eprintln!("warning: {warning}");
            }
            match warnings.len() {
                0 => println!("{}: ok", conf.display()),
                n => println!("{}: ok, {n} warning{}", conf.display(), if n == 1 { "" } else { "s" }),
            }
            Ok(())
        }
        Command::Demo {
            json,
            port,
            metrics_port,
            admin_port,
            chunk_delay_ms,
        } => {
            init_logging("warn");
            komilion::demo::run(komilion::demo::DemoOptions {
                json,
                port,
                metrics_port,
                admin_port,
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
        Command::Admin { conf, store, command } => {
            let url = match (store, conf) {
                (Some(url), _) => url,
                (None, Some(path)) => Config::load(&path)
                    .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?
                    .store
                    .ok_or_else(|| anyhow::anyhow!("{}: no `store:` configured", path.display()))?,
                (None, None) => bail!("give the config (-c FILE) or --store URL"),
            };
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            runtime.block_on(admin(&url, command))
        }
        Command::Catalog {
            command: CatalogCommand::ImportLitellm { file, catalog, output },
        } => {
            let current = match &catalog {
                Some(path) => std::fs::read_to_string(path).with_context(|| path.display().to_string())?,
                None => EMBEDDED_CATALOG.to_owned(),
            };
            let mut catalog_file: CatalogFile = serde_yaml::from_str(&current).context("reading the catalog")?;
            let litellm = std::fs::read_to_string(&file).with_context(|| file.display().to_string())?;
            let missing = import_litellm(&mut catalog_file, &litellm).map_err(anyhow::Error::msg)?;
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
                Some(path) => std::fs::write(&path, yaml).with_context(|| path.display().to_string())?,
                None => print!("{yaml}"),
            }
            Ok(())
        }
    }
}
