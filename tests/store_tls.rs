#![allow(clippy::unwrap_used)]
//! The PostgreSQL store over TLS (`sslmode`, `sslrootcert`), against a throwaway cluster that,
//! like managed PostgreSQL, refuses plain connections: `ssl = on` with a certificate from a
//! self-signed CA, and a pg_hba.conf of one `hostssl` line. One test uses a cluster without TLS,
//! to show the default still reaches it.
//!
//! Each test starts its own cluster (initdb, about 2 s) and stops it when done. Without
//! PostgreSQL's server programs or the `openssl` command the tests print why and pass.

mod common;

use common::{chat, mock_provider, GatewayProcess, ProviderSpec, STORE_PLUGINS};
use komilion::mock_provider::Behavior;
use komilion::store::{self, AccountStatus, StoreError, StoreEvent};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

/// What the cluster's server speaks.
#[derive(Clone, Copy)]
enum Tls {
    /// TLS and nothing else (`ssl = on`, `hostssl` only).
    Only,
    /// No TLS at all (`ssl = off`), as a local development server.
    Off,
}

/// A PostgreSQL cluster in a temp dir on 127.0.0.1; stopped on drop.
struct Cluster {
    dir: tempfile::TempDir,
    bin: PathBuf,
    port: u16,
    /// Tests run as root, which PostgreSQL refuses to run as.
    as_root: bool,
}

impl Cluster {
    /// None, with the reason printed, where the machine cannot run one.
    fn start() -> Option<Cluster> {
        Cluster::start_with(Tls::Only)
    }

    fn start_with(tls: Tls) -> Option<Cluster> {
        let bin = match pg_bin() {
            Some(bin) => bin,
            None => return skip("no PostgreSQL server programs (set KOMILION_TEST_PG_BIN to their directory)"),
        };
        if Command::new("openssl").arg("version").output().is_err() {
            return skip("no `openssl` command to make certificates with");
        }
        let as_root = std::fs::metadata("/proc/self").map(|m| m.uid() == 0).unwrap_or(false);
        if as_root
            && !Command::new("id")
                .arg("postgres")
                .output()
                .is_ok_and(|o| o.status.success())
        {
            return skip("running as root and there is no `postgres` user to run the server as");
        }
        let cluster = Cluster {
            dir: tempfile::tempdir().unwrap(),
            bin,
            port: common::free_port(),
            as_root,
        };
        cluster.make_certificates();
        if as_root {
            run(Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(cluster.dir.path()));
        }
        // The server refuses a key others can read.
        std::fs::set_permissions(cluster.path("server.key"), std::fs::Permissions::from_mode(0o600)).unwrap();
        run(cluster
            .pg("initdb")
            .args(["-A", "trust", "-U", "postgres", "--no-sync", "-D"])
            .arg(cluster.path("data")));
        let dir = cluster.dir.path().display();
        let ssl = match tls {
            Tls::Only => format!("ssl = on\nssl_cert_file = '{dir}/server.crt'\nssl_key_file = '{dir}/server.key'\n"),
            Tls::Off => "ssl = off\n".to_owned(),
        };
        let conf = format!(
            "\nlisten_addresses = '127.0.0.1'\nport = {port}\nunix_socket_directories = '{dir}'\n{ssl}\
             fsync = off\nmax_connections = 60\nshared_buffers = 16MB\n",
            port = cluster.port
        );
        let mut postgresql_conf = std::fs::read_to_string(cluster.path("data/postgresql.conf")).unwrap();
        postgresql_conf.push_str(&conf);
        std::fs::write(cluster.path("data/postgresql.conf"), postgresql_conf).unwrap();
        // Encrypted TCP only, as managed PostgreSQL: a plain connection finds no matching line.
        let hba = match tls {
            Tls::Only => "hostssl all all 127.0.0.1/32 trust\n",
            Tls::Off => "host all all 127.0.0.1/32 trust\n",
        };
        std::fs::write(cluster.path("data/pg_hba.conf"), hba).unwrap();
        run(cluster
            .pg("pg_ctl")
            .args(["-w", "-t", "30", "-D"])
            .arg(cluster.path("data"))
            .arg("-l")
            .arg(cluster.path("server.log"))
            .arg("start"));
        Some(cluster)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// A PostgreSQL program, run as the `postgres` user when we are root.
    fn pg(&self, program: &str) -> Command {
        let program = self.bin.join(program);
        if self.as_root {
            let mut cmd = Command::new("runuser");
            cmd.args(["-u", "postgres", "--"]).arg(program);
            cmd
        } else {
            Command::new(program)
        }
    }

    /// A CA, a server certificate it signed for `localhost` and 127.0.0.1, and a second CA
    /// that signed nothing here.
    fn make_certificates(&self) {
        std::fs::write(
            self.path("openssl.cnf"),
            "[req]\ndistinguished_name = dn\nprompt = no\n[dn]\nCN = komilion test CA\n\
             [ca]\nbasicConstraints = critical, CA:TRUE\nkeyUsage = critical, keyCertSign, cRLSign\n\
             subjectKeyIdentifier = hash\n\
             [server]\nbasicConstraints = critical, CA:FALSE\nkeyUsage = critical, digitalSignature\n\
             extendedKeyUsage = serverAuth\nsubjectAltName = DNS:localhost, IP:127.0.0.1\n",
        )
        .unwrap();
        let openssl = |args: &[&str]| {
            run(Command::new("openssl").args(args).current_dir(self.dir.path()));
        };
        let key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
        for (name, subject) in [("ca", "/CN=komilion test CA"), ("other-ca", "/CN=someone else")] {
            let (keyout, out) = (format!("{name}.key"), format!("{name}.crt"));
            let mut args = vec![
                "req",
                "-x509",
                "-config",
                "openssl.cnf",
                "-extensions",
                "ca",
                "-subj",
                subject,
            ];
            args.extend(key);
            args.extend(["-keyout", &keyout, "-out", &out, "-days", "2"]);
            openssl(&args);
        }
        let mut args = vec!["req", "-new", "-config", "openssl.cnf", "-subj", "/CN=localhost"];
        args.extend(key);
        args.extend(["-keyout", "server.key", "-out", "server.csr"]);
        openssl(&args);
        openssl(&[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-set_serial",
            "2",
            "-days",
            "2",
            "-extfile",
            "openssl.cnf",
            "-extensions",
            "server",
            "-out",
            "server.crt",
        ]);
    }

    /// A store URL for this cluster: `host` and the query string (TLS parameters).
    fn url(&self, host: &str, query: &str) -> String {
        format!("postgres://postgres@{host}:{}/postgres{query}", self.port)
    }

    fn ca(&self) -> String {
        self.path("ca.crt").display().to_string()
    }

    fn other_ca(&self) -> String {
        self.path("other-ca.crt").display().to_string()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = self
            .pg("pg_ctl")
            .args(["-w", "-m", "immediate", "-D"])
            .arg(self.path("data"))
            .arg("stop")
            .output();
    }
}

fn skip(reason: &str) -> Option<Cluster> {
    eprintln!("skipped: {reason}");
    None
}

/// Where `initdb` and `pg_ctl` are: `KOMILION_TEST_PG_BIN`, else the newest of Debian's
/// `/usr/lib/postgresql/<version>/bin`.
fn pg_bin() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("KOMILION_TEST_PG_BIN") {
        return Some(PathBuf::from(dir)).filter(|d| d.join("initdb").exists());
    }
    std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| e.ok())
        .filter_map(|e| Some((e.file_name().to_str()?.parse::<u32>().ok()?, e.path().join("bin"))))
        .filter(|(_, bin)| bin.join("initdb").exists())
        .max_by_key(|(version, _)| *version)
        .map(|(_, bin)| bin)
}

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Why opening the store failed.
async fn open_err(url: &str) -> StoreError {
    match store::open(url).await {
        Ok(_) => panic!("{url} opened"),
        Err(e) => e,
    }
}

/// The server's log, for a failure message.
fn log(cluster: &Cluster) -> String {
    std::fs::read_to_string(cluster.path("server.log")).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn require_encrypts_and_the_store_works() {
    let Some(pg) = Cluster::start() else { return };
    // The server accepts only `hostssl`: that it answers at all shows the connection is encrypted.
    let url = pg.url("127.0.0.1", "?sslmode=require");
    let store = store::open(&url).await.unwrap_or_else(|e| panic!("{e}\n{}", log(&pg)));
    assert_eq!(store.backend(), "postgres");
    let account = store.create_account("Tls", "tls@example.com").await.unwrap();
    assert_eq!(store.get_account(&account.id).await.unwrap().name, "Tls");
    drop(store);
    // A second start finds the migrations done and the data there.
    let again = store::open(&url).await.unwrap();
    assert_eq!(
        again.get_account(&account.id).await.unwrap().email.as_deref(),
        Some("tls@example.com")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_modes_check_what_libpq_checks() {
    let Some(pg) = Cluster::start() else { return };
    let ca = pg.ca();
    // verify-full: the chain leads to our CA and the certificate names the host.
    for host in ["localhost", "127.0.0.1"] {
        let url = pg.url(host, &format!("?sslmode=verify-full&sslrootcert={ca}"));
        let store = store::open(&url).await.unwrap_or_else(|e| panic!("{host}: {e}"));
        store
            .create_account("Full", &format!("full-{host}@example.com"))
            .await
            .unwrap();
    }

    // A host name the certificate does not carry (reached at 127.0.0.1 through `hostaddr`):
    // verify-full refuses, verify-ca only checks the chain and accepts.
    let elsewhere = |mode: &str| {
        format!(
            "postgres://postgres@db.example.com:{}/postgres?hostaddr=127.0.0.1&sslmode={mode}&sslrootcert={ca}",
            pg.port
        )
    };
    let err = open_err(&elsewhere("verify-full")).await;
    let message = err.to_string();
    assert!(matches!(err, StoreError::Unavailable(_)), "{err:?}");
    assert!(
        message.contains("TLS handshake")
            && message.contains("sslmode=verify-full")
            && message.contains("not valid for name"),
        "{message}"
    );
    store::open(&elsewhere("verify-ca")).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_from_another_ca_is_refused() {
    let Some(pg) = Cluster::start() else { return };
    let other = pg.other_ca();
    for mode in ["verify-full", "verify-ca", "require"] {
        // With a root file, libpq checks the chain under `require` too.
        let err = open_err(&pg.url("localhost", &format!("?sslmode={mode}&sslrootcert={other}"))).await;
        let message = err.to_string();
        assert!(
            message.contains(&format!("sslmode={mode}")) && message.contains("UnknownIssuer"),
            "{mode}: {message}"
        );
    }
    // Without one, `require` encrypts and trusts whatever certificate it is shown.
    store::open(&pg.url("localhost", "?sslmode=require")).await.unwrap();
    // An unreadable root file is a configuration error, named as such.
    let err = open_err(&pg.url("localhost", "?sslmode=verify-full&sslrootcert=/nonexistent/ca.pem")).await;
    assert!(
        matches!(&err, StoreError::Invalid(m) if m.contains("sslrootcert /nonexistent/ca.pem")),
        "{err:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_connection_is_refused_by_the_server() {
    let Some(pg) = Cluster::start() else { return };
    let err = open_err(&pg.url("127.0.0.1", "?sslmode=disable")).await;
    assert!(
        err.to_string().contains("no encryption"),
        "the server's reason comes through: {err}"
    );
    // Without `sslmode` the default is libpq's `prefer`: TLS when the server offers it, so the
    // same server is reached encrypted.
    let store = store::open(&pg.url("127.0.0.1", "")).await.unwrap();
    store.create_account("Prefer", "prefer@example.com").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_without_tls_is_still_reached_by_default() {
    let Some(pg) = Cluster::start_with(Tls::Off) else {
        return;
    };
    // `prefer` asks for TLS, hears no, and goes on in plain text, as before TLS support.
    let store = store::open(&pg.url("127.0.0.1", "")).await.unwrap();
    store.create_account("Plain", "plain@example.com").await.unwrap();
    let err = open_err(&pg.url("127.0.0.1", "?sslmode=require")).await;
    assert!(err.to_string().contains("server does not support TLS"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_reach_other_instances_over_tls() {
    let Some(pg) = Cluster::start() else { return };
    let url = pg.url("localhost", &format!("?sslmode=verify-full&sslrootcert={}", pg.ca()));
    let a = store::open(&url).await.unwrap();
    let b = store::open(&url).await.unwrap();
    let mut events = b.subscribe();
    let account = a.create_account("Listen", "listen@example.com").await.unwrap();
    // B hears of A's change only through its LISTEN connection. That connection starts in the
    // background, so change the account until B hears of it (or give up).
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut status = AccountStatus::Disabled;
    'heard: while Instant::now() < deadline {
        a.set_account_status(&account.id, status).await.unwrap();
        status = match status {
            AccountStatus::Disabled => AccountStatus::Active,
            _ => AccountStatus::Disabled,
        };
        let wait = Instant::now() + Duration::from_millis(500);
        while let Ok(Ok(event)) = tokio::time::timeout_at(wait.into(), events.recv()).await {
            if event == StoreEvent::Account(account.id.clone()) {
                break 'heard;
            }
        }
        assert!(Instant::now() < deadline, "instance B never heard of the change");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_serves_with_a_verified_tls_store() {
    let Some(pg) = Cluster::start() else { return };
    let url = pg.url("localhost", &format!("?sslmode=verify-full&sslrootcert={}", pg.ca()));
    let mock = mock_provider(Behavior::default()).await;
    let (gw, admin) = GatewayProcess::with_store(
        &[ProviderSpec::new("sim", mock.base_url(), &["gpt-4o-mini"])],
        &url,
        STORE_PLUGINS,
        "",
    );
    let (_, _, secret) = admin
        .account_with_key(serde_json::json!({"name": "tls"}), Some("1"))
        .await;
    let (status, body, _) = chat(&gw, &secret, "gpt-4o-mini").await;
    assert_eq!(status, 200, "{body}");
}

/// `komilion serve` stops at start, with the reason, when the store's certificate is not trusted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_refuses_to_start_on_an_untrusted_store() {
    let Some(pg) = Cluster::start() else { return };
    let url = pg.url(
        "localhost",
        &format!("?sslmode=verify-full&sslrootcert={}", pg.other_ca()),
    );
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("komilion.yaml");
    std::fs::write(
        &config,
        format!(
            "listen:\n  gateway: [\"127.0.0.1:{}\"]\nproviders:\n  - name: sim\n    kind: openai\n    \
             base_url: http://127.0.0.1:9/v1\n    api_key: k\n    models: [m]\n\
             store: \"{url}\"\nusage:\n  spool_dir: \"{}/spool\"\n",
            common::free_port(),
            dir.path().display()
        ),
    )
    .unwrap();
    let out = Command::new(common::BIN)
        .args(["serve", "-c"])
        .arg(&config)
        .env("KOMILION_MASTER_KEY", common::TEST_MASTER_KEY)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("sslmode=verify-full") && stderr.contains("UnknownIssuer"),
        "{stderr}"
    );
}
