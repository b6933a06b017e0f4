//! TLS to PostgreSQL with libpq's sslmode semantics, against a real server with `ssl = on` and a
//! CA and certificates generated here.

mod common;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use deploywatch::postgres::pool::TargetPool;
use deploywatch::postgres::runner::query_read_only;
use deploywatch::postgres::target::{ConnectionParts, ConnectionSettings};
use deploywatch_testkit::pgcluster::{ClusterOptions, PgCluster};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};

struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

fn ca(name: &str) -> (CertificateParams, KeyPair, String) {
    let key = KeyPair::generate().expect("key");
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    let pem = params.self_signed(&key).expect("ca").pem();
    (params, key, pem)
}

fn leaf(names: &[&str], common_name: &str, issuer: &Issuer<'_, KeyPair>) -> (String, String) {
    let key = KeyPair::generate().expect("key");
    let mut params =
        CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
            .expect("params");
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    let cert = params.signed_by(&key, issuer).expect("sign");
    (cert.pem(), key.serialize_pem())
}

/// A CA, a server certificate for `localhost`, a client certificate for user `postgres`, and an
/// unrelated CA.
fn pki() -> Pki {
    let dir = tempfile::tempdir().expect("tempdir");
    let (params, key, ca_pem) = ca("deploywatch test CA");
    let issuer = Issuer::new(params, key);
    let (server_pem, server_key) = leaf(&["localhost"], "localhost", &issuer);
    let (client_pem, client_key) = leaf(&[], "postgres", &issuer);
    let (_, _, other_ca) = ca("some other CA");
    for (name, text) in [
        ("ca.pem", ca_pem.as_str()),
        ("server.pem", server_pem.as_str()),
        ("server.key", server_key.as_str()),
        ("client.pem", client_pem.as_str()),
        ("client.key", client_key.as_str()),
        ("other-ca.pem", other_ca.as_str()),
    ] {
        std::fs::write(dir.path().join(name), text).expect("write");
    }
    // The server reads its key as the postgres user and wants it private.
    let owner = std::process::Command::new("chown")
        .arg("-R")
        .arg("postgres")
        .arg(dir.path())
        .status()
        .expect("chown");
    assert!(owner.success());
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .expect("chmod");
    std::fs::set_permissions(
        dir.path().join("server.key"),
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .expect("chmod");
    Pki { dir }
}

fn tls_cluster(pki: &Pki, hba: &str) -> PgCluster {
    let quote = |p: PathBuf| format!("'{}'", p.display());
    PgCluster::start(ClusterOptions {
        extra_conf: vec![
            ("ssl".into(), "on".into()),
            ("ssl_cert_file".into(), quote(pki.path("server.pem"))),
            ("ssl_key_file".into(), quote(pki.path("server.key"))),
            ("ssl_ca_file".into(), quote(pki.path("ca.pem"))),
        ],
        hba: Some(format!("local all all trust\n{hba}")),
        ..ClusterOptions::default()
    })
    .expect("PostgreSQL with TLS")
}

/// Connects with the given options and runs `SELECT ssl FROM pg_stat_ssl` for this session.
async fn connect(pg: &PgCluster, host: &str, options: &[(&str, String)]) -> Result<bool, String> {
    let options: BTreeMap<String, String> = options
        .iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect();
    let url = format!(
        "host={host} port={} user=postgres dbname=postgres",
        pg.port()
    );
    let parts = ConnectionParts {
        url: Some(&url),
        tls_options: options,
        ..ConnectionParts::default()
    };
    let mut settings =
        ConnectionSettings::new(parts, Duration::from_secs(5)).map_err(|e| e.to_string())?;
    // The client certificates are issued to the bootstrap superuser.
    settings.allow_superuser = true;
    let pool = TargetPool::new(
        "tls",
        settings,
        1,
        Duration::from_secs(10),
        Duration::from_secs(5),
    );
    let result = query_read_only(
        &pool,
        "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
        &[],
        Duration::from_secs(5),
        Duration::from_secs(1),
    )
    .await;
    pool.close();
    let table = result.map_err(|e| e.message)?;
    Ok(matches!(
        table.rows.first().and_then(|r| r.first()),
        Some(deploywatch::checks::outcome::Cell::Bool(true))
    ))
}

fn path(pki: &Pki, name: &str) -> String {
    pki.path(name).display().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sslmodes_behave_like_libpq() {
    let pki = pki();
    // TLS is mandatory: plain connections are rejected by pg_hba.conf.
    let pg = tls_cluster(
        &pki,
        "hostssl all all 127.0.0.1/32 trust\nhostnossl all all 127.0.0.1/32 reject\n",
    );

    // `sslmode` with the root certificate `ca`.
    let checking = |mode: &str, ca: &str| {
        vec![
            ("sslmode", mode.to_string()),
            ("sslrootcert", path(&pki, ca)),
        ]
    };
    let full = |ca: &str| checking("verify-full", ca);
    assert_eq!(
        connect(&pg, "localhost", &full("ca.pem")).await,
        Ok(true),
        "verify-full with the right CA and name"
    );
    let wrong_ca = connect(&pg, "localhost", &full("other-ca.pem"))
        .await
        .expect_err("wrong CA must fail");
    assert!(
        wrong_ca.to_lowercase().contains("unknownissuer") || wrong_ca.contains("issuer"),
        "{wrong_ca}"
    );
    let wrong_name = connect(&pg, "127.0.0.1", &full("ca.pem"))
        .await
        .expect_err("wrong host name must fail");
    assert!(
        wrong_name.contains("NotValidForName") || wrong_name.contains("not valid for"),
        "{wrong_name}"
    );
    // verify-ca checks the chain but not the name.
    let ca_only = checking("verify-ca", "ca.pem");
    assert_eq!(connect(&pg, "127.0.0.1", &ca_only).await, Ok(true));
    let ca_wrong = checking("verify-ca", "other-ca.pem");
    assert!(connect(&pg, "127.0.0.1", &ca_wrong).await.is_err());
    // require encrypts without checking; prefer uses TLS when offered.
    assert_eq!(
        connect(&pg, "127.0.0.1", &[("sslmode", "require".to_string())]).await,
        Ok(true)
    );
    // As in libpq, require with a root certificate checks the chain (like verify-ca).
    let require_with = |ca: &str| checking("require", ca);
    assert_eq!(
        connect(&pg, "127.0.0.1", &require_with("ca.pem")).await,
        Ok(true)
    );
    assert!(
        connect(&pg, "127.0.0.1", &require_with("other-ca.pem"))
            .await
            .is_err(),
        "require with a root certificate refuses a server it does not vouch for"
    );
    assert_eq!(
        connect(&pg, "127.0.0.1", &[("sslmode", "prefer".to_string())]).await,
        Ok(true)
    );
    // disable against a server that demands TLS fails clearly.
    let plain = connect(&pg, "127.0.0.1", &[("sslmode", "disable".to_string())])
        .await
        .expect_err("plain must fail");
    assert!(
        plain.contains("no encryption") || plain.contains("pg_hba.conf"),
        "{plain}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_certificate_is_accepted_where_pg_hba_requires_cert() {
    let pki = pki();
    let pg = tls_cluster(&pki, "hostssl all all 127.0.0.1/32 cert\n");
    let with_cert = vec![
        ("sslmode", "verify-full".to_string()),
        ("sslrootcert", path(&pki, "ca.pem")),
        ("sslcert", path(&pki, "client.pem")),
        ("sslkey", path(&pki, "client.key")),
    ];
    assert_eq!(connect(&pg, "localhost", &with_cert).await, Ok(true));
    let without = vec![
        ("sslmode", "verify-full".to_string()),
        ("sslrootcert", path(&pki, "ca.pem")),
    ];
    let refused = connect(&pg, "localhost", &without)
        .await
        .expect_err("no client certificate");
    assert!(
        refused.contains("certificate") || refused.contains("authentication"),
        "{refused}"
    );
}

#[test]
fn tls_options_are_read_from_the_target_configuration() {
    let dir = common::ConfigDir::new();
    dir.write("checks/p.toml", "[pack]\nname = \"p\"\n\n[[check]]\nname = \"c\"\ncategory = \"health\"\nseverity = \"info\"\nsql = \"SELECT 1\"\n");
    dir.write(
        "deploywatch.toml",
        "[[targets]]\nname = \"managed\"\nurl = \"postgres://u@db.example.com/app?sslmode=verify-full&sslrootcert=system\"\n\n\
         [[targets]]\nname = \"bad\"\nhost = \"db\"\nsslmode = \"verify-full\"\n",
    );
    let error =
        deploywatch::config::Config::load(&dir.main()).expect_err("verify-full without a root");
    assert!(
        error.to_string().contains("targets[1].url") && error.to_string().contains("sslrootcert"),
        "{error}"
    );
}

/// A PostgreSQL store over TLS: `sslmode` and `sslrootcert` in `store.url` mean what they mean
/// for targets (libpq's), against a server that refuses plain connections.
#[test]
fn a_store_on_postgresql_speaks_tls_as_its_url_says() {
    use deploywatch::config::store_settings;
    use deploywatch::storage::Store;

    let pki = pki();
    let pg = tls_cluster(
        &pki,
        "hostssl all all 127.0.0.1/32 trust\nhostnossl all all 127.0.0.1/32 reject\n",
    );
    let url = |query: &str| {
        format!(
            "postgres://postgres@localhost:{}/postgres?{query}",
            pg.port()
        )
    };
    let verified = Store::postgres(
        store_settings(
            &url(&format!(
                "sslmode=verify-full&sslrootcert={}",
                path(&pki, "ca.pem")
            )),
            None,
        )
        .expect("settings"),
    );
    verified
        .set_last_version("t", "3.7.0", 1.0)
        .expect("written over TLS");
    assert_eq!(
        verified.last_version("t").expect("read"),
        Some("3.7.0".to_string())
    );
    let encrypted = pg
        .psql(
            "postgres",
            "SELECT count(*) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) \
             WHERE a.application_name = 'deploywatch' AND s.ssl",
        )
        .expect("pg_stat_ssl");
    assert_eq!(encrypted.trim(), "1", "the store's session is encrypted");

    let wrong_ca = Store::postgres(
        store_settings(
            &url(&format!(
                "sslmode=verify-full&sslrootcert={}",
                path(&pki, "other-ca.pem")
            )),
            None,
        )
        .expect("settings"),
    );
    let refused = wrong_ca
        .last_version("t")
        .expect_err("a server the CA does not vouch for");
    assert!(refused.to_string().contains("ssuer"), "{refused}");

    let plain = Store::postgres(store_settings(&url("sslmode=disable"), None).expect("settings"));
    let refused = plain.last_version("t").expect_err("plain is rejected");
    assert!(
        refused.to_string().contains("no encryption") || refused.to_string().contains("pg_hba"),
        "{refused}"
    );

    let missing = store_settings(
        &url("sslmode=verify-full&sslrootcert=/nonexistent/ca.pem"),
        None,
    )
    .err()
    .expect("an unreadable root certificate is a configuration error");
    assert!(missing.contains("/nonexistent/ca.pem"), "{missing}");
}
