//! The layering ARCHITECTURE.md promises, checked on the source itself: each layer folder uses
//! only the layers below it, SQL drivers, HTTP and SQLite stay in their one place, and the pure
//! layers do no I/O and never read the clock; every declared dependency is used.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// The layers from the bottom up. A layer may use only those before it.
const LAYERS: &[&str] = &[
    "labels", "time", "shard", "checks", "analysis", "storage", "postgres", "config", "watch",
    "server", "daemon", "commands",
];

/// Layers that are neither below nor above each other may not use each other either.
const UNRELATED: &[(&str, &str)] = &[("storage", "postgres"), ("postgres", "storage")];

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read src") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The layer a file of `src/` belongs to (`None` for the crate root and `main.rs`).
fn layer_of(path: &Path) -> Option<String> {
    let relative = path.strip_prefix(root().join("src")).ok()?;
    let first = relative.components().next()?.as_os_str().to_str()?;
    let name = first.trim_end_matches(".rs");
    LAYERS.contains(&name).then(|| name.to_string())
}

/// The source's code lines: comments and doc comments are left out, so a doc link to a layer
/// above is not a dependency.
fn code_lines(path: &Path) -> Vec<(usize, String)> {
    let text = std::fs::read_to_string(path).expect("read source");
    text.lines()
        .enumerate()
        .filter(|(_, line)| !line.trim_start().starts_with("//"))
        .map(|(n, line)| (n + 1, line.to_string()))
        .collect()
}

fn sources() -> Vec<PathBuf> {
    let mut files = Vec::new();
    rust_files(&root().join("src"), &mut files);
    files.sort();
    files
}

fn used_layers(line: &str) -> BTreeSet<String> {
    let mut used = BTreeSet::new();
    let mut rest = line;
    while let Some(at) = rest.find("crate::") {
        let after = &rest[at + "crate::".len()..];
        let name: String = after
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        if LAYERS.contains(&name.as_str()) {
            used.insert(name);
        }
        rest = after;
    }
    used
}

#[test]
fn layers_use_only_the_layers_below_them() {
    let mut violations = Vec::new();
    for file in sources() {
        let Some(layer) = layer_of(&file) else {
            continue;
        };
        let rank = LAYERS.iter().position(|l| *l == layer).expect("ranked");
        for (number, line) in code_lines(&file) {
            for used in used_layers(&line) {
                if used == layer {
                    continue;
                }
                let used_rank = LAYERS.iter().position(|l| *l == used).expect("ranked");
                let unrelated = UNRELATED.contains(&(layer.as_str(), used.as_str()));
                if used_rank > rank || unrelated {
                    violations.push(format!("{}:{number}: {layer} uses {used}", file.display()));
                }
            }
        }
    }
    assert!(
        violations.is_empty(),
        "upward or sideways dependencies:\n{}",
        violations.join("\n")
    );
}

/// Files (relative to `src/`) that mention `needle` in code, outside the allowed prefixes.
fn mentions_outside(needle: &str, allowed: &[&str]) -> Vec<String> {
    mentions_outside_where(needle, allowed, |_, _| true)
}

/// [`mentions_outside`], counting only the lines where `counts(file, code)` holds.
fn mentions_outside_where(
    needle: &str,
    allowed: &[&str],
    counts: impl Fn(&str, &str) -> bool,
) -> Vec<String> {
    let src = root().join("src");
    let mut found = Vec::new();
    for file in sources() {
        let relative = file
            .strip_prefix(&src)
            .expect("under src")
            .to_string_lossy()
            .replace('\\', "/");
        if allowed.iter().any(|prefix| relative.starts_with(prefix)) {
            continue;
        }
        for (number, line) in code_lines(&file) {
            if line.contains(needle) && counts(&relative, &line) {
                found.push(format!("{relative}:{number}: {}", line.trim()));
            }
        }
    }
    found
}

#[test]
fn only_the_postgres_layer_talks_to_postgresql() {
    // The store's blocking driver (storage/sql.rs) is built on tokio-postgres and takes its
    // TLS connector; nothing else of it is used there.
    let found = mentions_outside_where("tokio_postgres", &["postgres/"], |file, code| {
        !(file == "storage/sql.rs"
            && code
                .match_indices("tokio_postgres")
                .all(|(at, _)| code[at..].starts_with("tokio_postgres_rustls::")))
    });
    assert_none(&found, "tokio_postgres outside src/postgres/");
}

#[test]
fn only_the_store_on_postgresql_uses_the_blocking_driver() {
    // The `postgres` crate (blocking, for the store's own thread), as opposed to the layer
    // `crate::postgres` and the async `tokio_postgres`.
    let found = mentions_outside_where("postgres::", &["storage/sql.rs"], |_, code| {
        code.match_indices("postgres::").any(|(at, _)| {
            let before = &code[..at];
            !(before.ends_with("crate::") || before.ends_with("tokio_"))
        })
    });
    assert_none(
        &found,
        "the blocking PostgreSQL driver outside src/storage/sql.rs",
    );
}

#[test]
fn only_the_server_and_the_client_know_hyper() {
    let found = mentions_outside(
        "hyper",
        &["server/http.rs", "server/trust.rs", "commands/client.rs"],
    );
    assert_none(&found, "hyper outside http.rs, trust.rs and client.rs");
}

#[test]
fn only_the_store_knows_sqlite() {
    let found = mentions_outside("rusqlite", &["storage/"]);
    assert_none(&found, "rusqlite outside src/storage/");
}

#[test]
fn only_the_demo_uses_the_test_support_crate() {
    let found = mentions_outside("deploywatch_testkit", &["commands/demo.rs"]);
    assert_none(&found, "the test kit outside the demo");
}

#[test]
fn pure_layers_do_no_io_and_never_read_the_clock() {
    let forbidden = [
        "std::fs",
        "std::net",
        "tokio",
        "SystemTime",
        "Instant::now",
        "unix_now",
        "std::process",
        "std::env",
    ];
    let mut found = Vec::new();
    for needle in forbidden {
        for hit in mentions_outside(needle, &[]) {
            if hit.starts_with("checks/")
                || hit.starts_with("analysis/")
                || hit.starts_with("labels")
                || hit.starts_with("shard.rs")
            {
                found.push(format!("{needle}: {hit}"));
            }
        }
    }
    assert_none(&found, "I/O or clock reads in a pure layer");
}

/// Fails with `what` and the places found unless none was.
fn assert_none(found: &[String], what: &str) {
    assert!(found.is_empty(), "{what}:\n{}", found.join("\n"));
}

/// Crate names (as code writes them) of the `section` dependencies in the manifest at `manifest`.
fn declared_crates(manifest: &Path, section: &str) -> Vec<String> {
    let text = std::fs::read_to_string(manifest).expect("read manifest");
    let table: toml::Table = text.parse().expect("parse manifest");
    let Some(deps) = table.get(section).and_then(|d| d.as_table()) else {
        return Vec::new();
    };
    deps.keys()
        .map(|name| match name.as_str() {
            "md-5" => "md5".to_string(),
            other => other.replace('-', "_"),
        })
        .collect()
}

/// Whether any Rust file under `dirs` names `krate` as a path (`krate::` or `use krate`).
fn used_under(dirs: &[PathBuf], krate: &str) -> bool {
    let mut files = Vec::new();
    for dir in dirs.iter().filter(|d| d.is_dir()) {
        rust_files(dir, &mut files);
    }
    files.iter().any(|file| {
        code_lines(file).iter().any(|(_, line)| {
            line.contains(&format!("{krate}::"))
                || line.contains(&format!("use {krate}"))
                || line.contains(&format!("{krate}!"))
        })
    })
}

#[test]
fn every_dependency_is_used_where_it_is_declared() {
    let root = root();
    let testkit = root.join("testkit");
    let mut unused = Vec::new();
    let cases = [
        (
            root.join("Cargo.toml"),
            "dependencies",
            vec![root.join("src")],
        ),
        (
            root.join("Cargo.toml"),
            "dev-dependencies",
            vec![root.join("tests"), root.join("benches"), root.join("src")],
        ),
        (
            testkit.join("Cargo.toml"),
            "dependencies",
            vec![testkit.join("src")],
        ),
        (
            testkit.join("Cargo.toml"),
            "dev-dependencies",
            vec![testkit.join("src"), testkit.join("tests")],
        ),
    ];
    for (manifest, section, dirs) in cases {
        for krate in declared_crates(&manifest, section) {
            if !used_under(&dirs, &krate) {
                unused.push(format!("{} [{section}] {krate}", manifest.display()));
            }
        }
    }
    assert_none(&unused, "dependencies no code uses");
}
