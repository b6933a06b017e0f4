//! Protected endpoints with the exporter toolkit's web configuration: `/metrics` over TLS with
//! basic auth, 401 without the right password, probes left open, and a client without a
//! certificate refused when one is required; the CLI over HTTPS, and replicas forwarding
//! announcements to each other over HTTPS.

mod common;

use std::sync::Arc;

use base64::Engine as _;
use bytes::Bytes;
use common::ConfigDir;
use http_body_util::{BodyExt, Empty};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

struct Pki {
    ca: String,
    server: (String, String),
    client: (String, String),
}

fn pki() -> Pki {
    let key = KeyPair::generate().expect("key");
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(DnType::CommonName, "web test CA");
    let ca = params.self_signed(&key).expect("ca").pem();
    let issuer = Issuer::new(params, key);
    let leaf = |names: Vec<String>| {
        let key = KeyPair::generate().expect("key");
        let cert = CertificateParams::new(names)
            .expect("params")
            .signed_by(&key, &issuer)
            .expect("sign");
        (cert.pem(), key.serialize_pem())
    };
    Pki {
        ca,
        server: leaf(vec!["localhost".into(), "127.0.0.1".into()]),
        client: leaf(vec![]),
    }
}

fn pem_certs(pem: &str) -> Vec<CertificateDer<'static>> {
    rustls_pemfile::certs(&mut pem.as_bytes())
        .collect::<Result<_, _>>()
        .expect("certs")
}

/// GET over TLS; returns the status, or the error text when the handshake fails.
/// `https_get` with basic-auth credentials and no client certificate.
/// `/metrics` as `user`: see [`as_user`].
async fn scrape_as(port: u16, ca: &str, user: &str, password: &str) -> Result<u16, String> {
    as_user(port, "/metrics", ca, user, password).await
}

async fn as_user(
    port: u16,
    path: &str,
    ca: &str,
    user: &str,
    password: &str,
) -> Result<u16, String> {
    https_get(port, path, ca, None, Some((user, password))).await
}

async fn https_get(
    port: u16,
    path: &str,
    ca: &str,
    client: Option<&(String, String)>,
    basic: Option<(&str, &str)>,
) -> Result<u16, String> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in pem_certs(ca) {
        roots.add(cert).expect("root");
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots);
    let config = match client {
        Some((cert, key)) => {
            let key: PrivateKeyDer<'static> = rustls_pemfile::private_key(&mut key.as_bytes())
                .expect("key")
                .expect("key");
            builder
                .with_client_auth_cert(pem_certs(cert), key)
                .expect("client cert")
        }
        None => builder.with_no_client_auth(),
    };
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .map_err(|e| e.to_string())?;
    let tls = connector
        .connect(ServerName::try_from("localhost").expect("name"), tcp)
        .await
        .map_err(|e| e.to_string())?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
            .await
            .map_err(|e| e.to_string())?;
    tokio::spawn(connection);
    let mut request =
        hyper::Request::get(format!("https://localhost:{port}{path}")).header("host", "localhost");
    if let Some((user, password)) = basic {
        let encoded =
            base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
        request = request.header("authorization", format!("Basic {encoded}"));
    }
    let response = sender
        .send_request(request.body(Empty::<Bytes>::new()).expect("request"))
        .await
        .map_err(|e| e.to_string())?;
    let status = response.status().as_u16();
    let _ = response.into_body().collect().await;
    Ok(status)
}

/// The check pack of these tests: one check on a target that is never reached.
const PACK: &str = "[pack]\nname = \"p\"\n\n[[check]]\nname = \"c\"\ncategory = \"health\"\nseverity = \"info\"\nsql = \"SELECT 1\"\n";

/// The web configuration's TLS part: the server certificate and key [`write_pki`] writes.
const TLS: &str = "tls_server_config:\n  cert_file: server.pem\n  key_file: server.key\n";

/// A web configuration: [`TLS`] with one user, `user`, whose password is `password`.
fn tls_with_user(user: &str, password: &str) -> String {
    let hash = bcrypt::hash(password, 4).expect("hash");
    format!("{TLS}basic_auth_users:\n  {user}: '{hash}'\n")
}

/// The daemon serving HTTPS with `pki`'s server certificate and the web configuration `web`,
/// on a new configuration directory.
async fn daemon(pki: &Pki, web: &str) -> (ConfigDir, deploywatch::daemon::DaemonHandle) {
    let dir = ConfigDir::new();
    write_pki(&dir, pki);
    dir.write("web.yml", web);
    dir.write("checks/p.toml", PACK);
    dir.write(
        "deploywatch.toml",
        "[server]\nweb_config_file = \"web.yml\"\n\n[deployments]\nenabled = false\n\n[[targets]]\nname = \"nowhere\"\nhost = \"127.0.0.1\"\nport = 1\ndbname = \"x\"\n",
    );
    let handle = common::start(&dir).await;
    (dir, handle)
}

fn write_pki(dir: &ConfigDir, pki: &Pki) {
    dir.write("ca.pem", &pki.ca);
    dir.write("server.pem", &pki.server.0);
    dir.write("server.key", &pki.server.1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_over_tls_with_basic_auth() {
    let pki = pki();
    let (_dir, handle) = daemon(&pki, &tls_with_user("prometheus", "scrape-pass")).await;
    let port = handle.local_addr.port();
    assert_eq!(
        scrape_as(port, &pki.ca, "prometheus", "scrape-pass").await,
        Ok(200)
    );
    assert_eq!(
        scrape_as(port, &pki.ca, "prometheus", "wrong").await,
        Ok(401)
    );
    assert_eq!(
        https_get(port, "/metrics", &pki.ca, None, None).await,
        Ok(401)
    );
    assert_eq!(
        as_user(port, "/status", &pki.ca, "nobody", "scrape-pass").await,
        Ok(401)
    );
    assert_eq!(
        https_get(port, "/healthz", &pki.ca, None, None).await,
        Ok(200),
        "probes stay open"
    );
    // Plain HTTP is not served on a TLS port.
    let plain =
        deploywatch::commands::client::get(&format!("http://127.0.0.1:{port}/metrics"), "*/*")
            .await;
    assert!(plain.is_err() || plain.as_ref().is_ok_and(|(code, _)| code.as_u16() != 200));
    handle.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_without_a_certificate_is_refused_when_one_is_required() {
    let pki = pki();
    let (_dir, handle) = daemon(
        &pki,
        &format!("{TLS}  client_auth_type: RequireAndVerifyClientCert\n  client_ca_file: ca.pem\n"),
    )
    .await;
    let port = handle.local_addr.port();
    assert_eq!(
        https_get(port, "/metrics", &pki.ca, Some(&pki.client), None).await,
        Ok(200)
    );
    assert!(
        https_get(port, "/metrics", &pki.ca, None, None)
            .await
            .is_err(),
        "no client certificate, no answer"
    );
    handle.shutdown().await.expect("shutdown");
}

#[test]
fn a_broken_web_configuration_names_the_file_and_key() {
    let dir = ConfigDir::new();
    dir.write(
        "web.yml",
        "tls_server_config:\n  cert_file: missing.pem\n  key_file: missing.key\n",
    );
    dir.write("checks/p.toml", PACK);
    dir.write(
        "deploywatch.toml",
        "[server]\nweb_config_file = \"web.yml\"\n\n[[targets]]\nname = \"t\"\nhost = \"h\"\n",
    );
    let error = deploywatch::config::Config::load(&dir.main())
        .expect_err("rejected")
        .to_string();
    assert!(
        error.contains("server.web_config_file") && error.contains("tls_server_config.cert_file"),
        "{error}"
    );
}

/// The web configuration follows its files: a renewed certificate (from a new CA) and a changed
/// user list take effect without a restart, and a broken new version leaves the last good one
/// in force.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewed_certificates_and_users_take_effect_without_a_restart() {
    let old = pki();
    let (dir, handle) = daemon(&old, &tls_with_user("alice", "alice-pass")).await;
    let port = handle.local_addr.port();
    assert_eq!(
        scrape_as(port, &old.ca, "alice", "alice-pass").await,
        Ok(200)
    );

    // cert-manager renews the certificate from another CA; the users change too.
    let new = pki();
    write_pki(&dir, &new);
    dir.write("web.yml", &tls_with_user("bob", "bob-pass"));
    common::wait_until(
        "the new certificate is served",
        std::time::Duration::from_secs(10),
        || async { (scrape_as(port, &new.ca, "bob", "bob-pass").await == Ok(200)).then_some(()) },
    )
    .await;
    assert!(
        scrape_as(port, &old.ca, "bob", "bob-pass").await.is_err(),
        "the old certificate is no longer served"
    );
    assert_eq!(
        scrape_as(port, &new.ca, "alice", "alice-pass").await,
        Ok(401),
        "a removed user is refused"
    );

    // A broken version (a password instead of a hash) is ignored: bob still gets in.
    dir.write(
        "web.yml",
        &format!("{TLS}basic_auth_users:\n  bob: plain-text\n"),
    );
    // The file is re-read within a second: for longer than that, every request still gets in.
    let until = std::time::Instant::now() + std::time::Duration::from_millis(2500);
    while std::time::Instant::now() < until {
        assert_eq!(
            scrape_as(port, &new.ca, "bob", "bob-pass").await,
            Ok(200),
            "the broken version must not replace the last good one"
        );
    }
    handle.shutdown().await.expect("shutdown");
}

/// The CLI on the configuration file `config` with `args`, `env` set (and no login of the
/// caller's environment): its exit code and its output, stdout then stderr.
fn run_cli(config: &std::path::Path, args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String) {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_deploywatch"))
        .arg("--config")
        .arg(config)
        .args(args)
        .env_remove("DEPLOYWATCH_USER")
        .env_remove("DEPLOYWATCH_PASSWORD")
        .envs(env.iter().copied())
        .output()
        .expect("run deploywatch");
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stdout).into_owned()
            + &String::from_utf8_lossy(&output.stderr),
    )
}

/// The CLI talks to a daemon that serves HTTPS: `status` and `deploy mark` take `https://` URLs
/// and check the certificate against the system's roots and `--cacert`; without the CA that
/// signed it they fail as unreachable and say why. Without `--url` the scheme comes from the
/// configuration: its web configuration serves TLS, so the listen address is asked over HTTPS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_reaches_a_daemon_that_serves_https() {
    let pki = pki();
    let (dir, handle) = daemon(&pki, TLS).await;
    let port = handle.local_addr.port();
    let url = format!("https://127.0.0.1:{port}");
    let ca = dir.path().join("ca.pem");
    let ca = ca.to_str().expect("path");
    let cli = |config: &str, args: &[&str], env: &[(&str, &str)]| {
        run_cli(&dir.path().join(config), args, env)
    };
    let run = |args: &[&str]| cli("deploywatch.toml", args, &[]);
    let (code, output) = run(&["status", "--format", "json", "--url", &url, "--cacert", ca]);
    // The one target cannot be reached: `pending` until its check fails, then `failing`;
    // exit 1 either way, not 2.
    assert_eq!(code, Some(1), "{output}");
    let status: serde_json::Value = serde_json::from_str(&output).expect("the JSON of /status");
    assert!(
        status["status"] == "pending" || status["status"] == "failing",
        "{status}"
    );
    let (code, output) = run(&["status", "--url", &url]);
    assert_eq!(code, Some(2), "{output}");
    assert!(
        output.contains("certificate"),
        "an unknown issuer is named: {output}"
    );
    let (code, output) = run(&["status", "--url", &url, "--cacert", "missing.pem"]);
    assert_eq!(code, Some(2), "{output}");
    assert!(
        output.contains("cannot read --cacert missing.pem"),
        "{output}"
    );
    // An announcement goes over HTTPS too: the daemon answers it (it has no API token, so 401).
    let (code, output) = cli(
        "deploywatch.toml",
        &[
            "deploy",
            "mark",
            "--version",
            "1.0.0",
            "--url",
            &url,
            "--cacert",
            ca,
            "--token-env",
            "DW_TEST_TOKEN",
        ],
        &[("DW_TEST_TOKEN", "some-token")],
    );
    assert_eq!(code, Some(1), "{output}");
    assert!(output.contains("401"), "{output}");
    // No --url: the configured listen address, over HTTPS because web.yml serves TLS; the
    // same when the configuration does not load as a whole because this user cannot read the
    // daemon's key (here: it is not there), the address and the scheme then coming from
    // `[server]` and the web configuration's `tls_server_config` alone.
    let cli_config = |web: &str| {
        format!(
            "[server]\nlisten = \"127.0.0.1:{port}\"\nweb_config_file = \"{web}\"\n\n\
             [deployments]\nenabled = false\n\n[[targets]]\nname = \"nowhere\"\n\
             host = \"127.0.0.1\"\nport = 1\ndbname = \"x\"\n"
        )
    };
    dir.write("cli.toml", &cli_config("web.yml"));
    dir.write(
        "web-unreadable-key.yml",
        "tls_server_config:\n  cert_file: server.pem\n  key_file: daemon-only.key\n",
    );
    dir.write("cli-no-key.toml", &cli_config("web-unreadable-key.yml"));
    for config in ["cli.toml", "cli-no-key.toml"] {
        let (code, output) = cli(config, &["status", "--format", "json", "--cacert", ca], &[]);
        assert_eq!(code, Some(1), "{config}: {output}");
        assert!(
            output.contains("\"targets\""),
            "{config}: the JSON of /status: {output}"
        );
    }
    handle.shutdown().await.expect("shutdown");
}

/// Replicas that serve HTTPS forward announcements to each other over HTTPS: an announcement
/// sent to the replica that does not own its target reaches the owner, whose certificate is
/// checked against `server.shard_peers_ca_file`. With another CA in that file the owner's
/// certificate is not trusted: the forward fails with 502 and says why, and nothing is recorded
/// anywhere. The file is read again at a reload: renewed, it is trusted without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_that_serve_https_forward_announcements_over_https() {
    use deploywatch::commands::client;
    let pki = pki();
    let (first, second) = (common::name_in_shard(0, 2), common::name_in_shard(1, 2));
    let closed = common::free_port();
    let bind = || async {
        tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind")
    };
    let listeners = [bind().await, bind().await];
    let urls: Vec<String> = listeners
        .iter()
        .map(|l| {
            format!(
                "https://127.0.0.1:{}",
                l.local_addr().expect("address").port()
            )
        })
        .collect();
    // One configuration directory per replica, each with its own store.
    let replica = |shard: u32| {
        let dir = ConfigDir::new();
        write_pki(&dir, &pki);
        dir.write("web.yml", TLS);
        dir.write("token", "shard-token");
        dir.write("checks/p.toml", PACK);
        let server = format!(
            "web_config_file = \"web.yml\"\napi_token_file = \"token\"\nshard = \"{shard}/2\"\nshard_peers = [\"{}\", \"{}\"]\nshard_peers_ca_file = \"ca.pem\"\n",
            urls[0], urls[1]
        );
        dir.write(
            "deploywatch.toml",
            &common::replica_config(&server, closed, &[&first, &second]),
        );
        dir
    };
    let [l0, l1] = listeners;
    let dirs = [replica(0), replica(1)];
    let owner = deploywatch::daemon::start(dirs[1].load(), l1).expect("shard 1 starts");
    let asked = deploywatch::daemon::start(dirs[0].load(), l0).expect("shard 0 starts");
    let trust = client::Trust::new(Some(dirs[0].path().join("ca.pem")));
    let announcement = client::Announcement {
        target: Some(&second),
        version: "2.0.0",
        note: None,
        started_at: None,
    };
    let (code, body) = client::announce_with(&urls[0], "shard-token", &announcement, &trust)
        .await
        .expect("announce");
    assert_eq!(code.as_u16(), 201, "{body}");
    let list = |url: &str| {
        let trust = &trust;
        let url = format!("{url}/api/deployments");
        async move {
            let (code, body) = client::get_with(&url, "application/json", trust)
                .await
                .expect("list");
            assert_eq!(code.as_u16(), 200, "{body}");
            body
        }
    };
    let recorded = list(&urls[1]).await;
    assert!(
        recorded.contains("2.0.0") && recorded.contains(&second),
        "the owner recorded it: {recorded}"
    );
    assert_eq!(
        list(&urls[0]).await.trim(),
        "[]",
        "the replica asked did not"
    );
    asked.shutdown().await.expect("shutdown");

    // The same replica with another CA in its CA file (the replicas' CA was rotated and this
    // file not yet): the owner's certificate is not trusted.
    let untrusting = replica(0);
    untrusting.write("ca.pem", &crate::pki().ca);
    let listener = tokio::net::TcpListener::bind(urls[0].trim_start_matches("https://"))
        .await
        .expect("bind the first replica's address again");
    let asked = deploywatch::daemon::start(untrusting.load(), listener).expect("shard 0 starts");
    let announcement = client::Announcement {
        version: "3.0.0",
        ..announcement
    };
    let (code, body) = client::announce_with(&urls[0], "shard-token", &announcement, &trust)
        .await
        .expect("announce");
    assert_eq!(code.as_u16(), 502, "{body}");
    assert!(
        body.contains("certificate") && body.contains("server.shard_peers_ca_file"),
        "{body}"
    );
    assert!(
        !list(&urls[1]).await.contains("3.0.0"),
        "the owner recorded nothing"
    );
    assert_eq!(
        list(&urls[0]).await.trim(),
        "[]",
        "nor did the replica asked"
    );

    // The CA file renewed and the configuration reloaded: the file is read again, and the
    // owner's certificate is trusted without a restart.
    untrusting.write("ca.pem", &pki.ca);
    asked
        .events
        .send(deploywatch::daemon::Event::Reload)
        .await
        .expect("reload");
    let body = common::wait_until(
        "the announcement is forwarded after the reload",
        std::time::Duration::from_secs(20),
        || async {
            let answer =
                client::announce_with(&urls[0], "shard-token", &announcement, &trust).await;
            answer
                .ok()
                .and_then(|(code, body)| (code.as_u16() == 201).then_some(body))
        },
    )
    .await;
    assert!(body.contains("3.0.0"), "{body}");
    assert!(
        list(&urls[1]).await.contains("3.0.0"),
        "the owner recorded it"
    );
    asked.shutdown().await.expect("shutdown");
    owner.shutdown().await.expect("shutdown");
}

/// `deploywatch status` against a daemon whose web configuration asks for a user: without one
/// it says how to give it; with `--user` and the password in `DEPLOYWATCH_PASSWORD` it reads
/// `/status` (JSON and the text table); a wrong password is named as refused. Each failure
/// exits 2, like any daemon that cannot be read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_logs_in_to_a_daemon_that_asks_for_a_user() {
    let pki = pki();
    let (dir, handle) = daemon(&pki, &tls_with_user("sre", "s3cret")).await;
    let url = format!("https://127.0.0.1:{}", handle.local_addr.port());
    let ca = dir.path().join("ca.pem");
    let ca = ca.to_str().expect("path");
    let config = dir.path().join("deploywatch.toml");
    let cli = |args: &[&str], env: &[(&str, &str)]| {
        let status = ["status", "--url", &url, "--cacert", ca];
        run_cli(&config, &[&status[..], args].concat(), env)
    };
    let (code, output) = cli(&[], &[]);
    assert_eq!(code, Some(2), "{output}");
    assert!(
        output.contains("401")
            && output.contains("--user")
            && output.contains("DEPLOYWATCH_PASSWORD"),
        "{output}"
    );
    let (code, output) = cli(&["--user", "sre"], &[]);
    assert_eq!(code, Some(2), "{output}");
    assert!(output.contains("DEPLOYWATCH_PASSWORD"), "{output}");
    // Logged in: the one target cannot be reached, so pending or failing, exit 1.
    let (code, output) = cli(
        &["--user", "sre", "--format", "json"],
        &[("DEPLOYWATCH_PASSWORD", "s3cret")],
    );
    assert_eq!(code, Some(1), "{output}");
    let status: serde_json::Value = serde_json::from_str(&output).expect("the JSON of /status");
    assert!(
        status["targets"].is_array() || status["targets"].is_object(),
        "{status}"
    );
    let (code, output) = cli(
        &[],
        &[
            ("DEPLOYWATCH_USER", "sre"),
            ("DEPLOYWATCH_PASSWORD", "s3cret"),
        ],
    );
    assert_eq!(code, Some(1), "{output}");
    assert!(
        output.contains("nowhere"),
        "the table names the target: {output}"
    );
    let (code, output) = cli(
        &["--user", "sre"],
        &[("DEPLOYWATCH_PASSWORD", "n0t-the-password")],
    );
    assert_eq!(code, Some(2), "{output}");
    assert!(
        output.contains("\"sre\" or its password was refused"),
        "{output}"
    );
    assert!(
        !output.contains("n0t-the-password"),
        "the password is never shown: {output}"
    );
    let (code, output) = cli(&["--user", "s:re"], &[("DEPLOYWATCH_PASSWORD", "s3cret")]);
    assert_eq!(code, Some(2), "{output}");
    assert!(output.contains("cannot hold ':'"), "{output}");
    handle.shutdown().await.expect("shutdown");
}
