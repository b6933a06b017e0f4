//! The shipped configuration, the systemd unit, the container image and the Kubernetes
//! manifests agree on one install layout (deploy/README.md, "The install layout"): where the
//! binary, the configuration, the packs and the state store are, so that the shipped
//! configuration works wherever it is installed.

mod common;

use std::path::{Path, PathBuf};

use common::repo;

const CONFIG: &str = "/etc/deploywatch/deploywatch.toml";
const BINARY: &str = "/usr/local/bin/deploywatch";
const STATE_DIR: &str = "/var/lib/deploywatch";

fn read(relative: &str) -> String {
    std::fs::read_to_string(repo().join(relative)).unwrap_or_else(|e| panic!("{relative}: {e}"))
}

/// `KEY=value` lines of a unit file (the last one wins).
fn unit_value(unit: &str, key: &str) -> String {
    unit.lines()
        .rev()
        .find_map(|l| l.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("the unit has no {key}="))
        .trim()
        .to_string()
}

/// The shipped configuration's store path, as loaded (relative paths resolved against the file).
fn shipped_store_path(main: &Path) -> PathBuf {
    let config = deploywatch::config::Config::load(main)
        .unwrap_or_else(|e| panic!("{} does not load: {e}", main.display()));
    config
        .store
        .path
        .clone()
        .expect("the shipped configuration keeps its state in a store")
}

#[test]
fn the_shipped_configuration_keeps_its_state_where_the_unit_may_write() {
    let unit = read("deploy/systemd/deploywatch.service");
    // Installed as deploy/README.md says: the main file and the packs under /etc/deploywatch.
    let root = tempfile::tempdir().expect("tempdir");
    let etc = root.path().join("etc/deploywatch");
    std::fs::create_dir_all(etc.join("checks")).expect("mkdir");
    std::fs::write(
        etc.join("deploywatch.toml"),
        read("config/deploywatch.toml"),
    )
    .expect("write");
    for pack in ["postgres.toml", "cognit-3.7.0.toml"] {
        std::fs::write(
            etc.join("checks").join(pack),
            read(&format!("config/checks/{pack}")),
        )
        .expect("write");
    }
    let store = shipped_store_path(&etc.join("deploywatch.toml"));
    let state_dir = PathBuf::from("/var/lib").join(unit_value(&unit, "StateDirectory"));
    assert_eq!(state_dir, Path::new(STATE_DIR));
    assert!(
        store.starts_with(&state_dir),
        "installed, the shipped store.path resolves to {} which is outside the unit's writable \
         StateDirectory {}",
        store.display(),
        state_dir.display()
    );
    // The unit runs the installed binary with the installed configuration, and validates it first.
    assert_eq!(
        unit_value(&unit, "ExecStart"),
        format!("{BINARY} --config {CONFIG} run")
    );
    assert_eq!(
        unit_value(&unit, "ExecStartPre"),
        format!("{BINARY} --config {CONFIG} validate")
    );
    assert_eq!(unit_value(&unit, "ProtectSystem"), "strict");
    // Its documentation links are the files the install steps put there.
    let readme = read("deploy/README.md");
    for link in unit_value(&unit, "Documentation").split_whitespace() {
        let file = link.strip_prefix("file:").expect("a local file");
        let dir = Path::new(file).parent().expect("dir").to_string_lossy();
        let name = Path::new(file).file_name().expect("name").to_string_lossy();
        assert!(
            readme.contains(&format!("-t {dir} README.md docs/*.md")),
            "{dir}"
        );
        assert!(
            repo().join(&*name).is_file() || repo().join("docs").join(&*name).is_file(),
            "{name}"
        );
    }
}

#[test]
fn the_container_image_uses_the_same_layout() {
    let dockerfile = read("deploy/container/Dockerfile");
    let lines: Vec<&str> = dockerfile.lines().map(str::trim).collect();
    let has = |line: &str| lines.contains(&line);
    assert!(has(&format!(
        "COPY --from=build /src/target/release/deploywatch {BINARY}"
    )));
    assert!(has("COPY config/checks /etc/deploywatch/checks"));
    assert!(has(&format!("COPY config/deploywatch.toml {CONFIG}")));
    assert!(has(&format!("VOLUME [\"{STATE_DIR}\"]")));
    assert!(has(&format!("CMD [\"--config\", \"{CONFIG}\", \"run\"]")));
    assert!(
        has("ENV DEPLOYWATCH_SERVER__LISTEN=0.0.0.0:9788"),
        "inside a container the loopback address of the shipped configuration is unreachable"
    );
    // The build sees every file of the crate, whatever its layout, but not the local target/.
    assert!(has("COPY . ."));
    let ignore = read(".dockerignore");
    assert!(
        ignore.lines().any(|l| l.trim() == "target/"),
        ".dockerignore"
    );
    // Every other path it copies exists.
    for line in &lines {
        if let Some(rest) = line.strip_prefix("COPY ") {
            if rest.starts_with("--from") || rest == ". ." {
                continue;
            }
            let source = rest.split_whitespace().next().expect("source");
            assert!(repo().join(source).exists(), "COPY {source}: no such path");
        }
    }
    let uid = lines
        .iter()
        .find_map(|l| l.strip_prefix("USER "))
        .expect("USER");
    let deployment = read("deploy/kubernetes/deployment.yaml");
    assert!(
        deployment.contains(&format!("runAsUser: {uid}")),
        "the pod runs as the image's user {uid}"
    );
}

/// The main file of the ConfigMap `deploywatch` among `documents`, with the shipped pack it
/// names, in a configuration directory.
fn configmap_config(documents: &[serde_yaml::Value]) -> common::ConfigDir {
    let text = documents
        .iter()
        .find(|d| d["metadata"]["name"] == "deploywatch")
        .and_then(|d| d["data"]["deploywatch.toml"].as_str())
        .expect("deploywatch.toml in the ConfigMap");
    let dir = common::ConfigDir::new();
    dir.add_shipped_pack("postgres.toml");
    dir.write("deploywatch.toml", text);
    dir
}

/// A Kubernetes container's arguments.
fn container_args(container: &serde_yaml::Value) -> Vec<&str> {
    container["args"]
        .as_sequence()
        .expect("args")
        .iter()
        .filter_map(|a| a.as_str())
        .collect()
}

/// The value of `--config` in a command line.
fn config_option<'a>(args: &[&'a str]) -> &'a str {
    args.iter()
        .position(|a| *a == "--config")
        .and_then(|i| args.get(i + 1).copied())
        .expect("--config and its value")
}

#[test]
fn the_kubernetes_manifests_use_the_same_layout() {
    let deployment: serde_yaml::Value =
        serde_yaml::from_str(&read("deploy/kubernetes/deployment.yaml")).expect("yaml");
    let container = &deployment["spec"]["template"]["spec"]["containers"][0];
    let args = container_args(container);
    assert_eq!(config_option(&args), CONFIG);
    let mounts: Vec<(String, String)> = container["volumeMounts"]
        .as_sequence()
        .expect("volumeMounts")
        .iter()
        .map(|m| {
            (
                m["name"].as_str().expect("name").to_string(),
                m["mountPath"].as_str().expect("mountPath").to_string(),
            )
        })
        .collect();
    let mount = |name: &str| {
        mounts
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, p)| p.clone())
            .unwrap_or_else(|| panic!("no {name} mount"))
    };
    assert_eq!(mount("config"), CONFIG);
    assert_eq!(mount("checks"), "/etc/deploywatch/checks");
    assert_eq!(mount("state"), STATE_DIR);

    // The ConfigMap's configuration, installed where the pod mounts it, keeps its state on the
    // state volume and reads its password from the Secret's mount.
    let documents: Vec<serde_yaml::Value> =
        serde_yaml::Deserializer::from_str(&read("deploy/kubernetes/configmap.yaml"))
            .map(|d| serde::Deserialize::deserialize(d).expect("yaml"))
            .collect();
    let dir = configmap_config(&documents);
    let store = shipped_store_path(&dir.main());
    assert!(store.starts_with(STATE_DIR), "{}", store.display());
    let text = std::fs::read_to_string(dir.main()).expect("main file");
    let raw: toml::Value = toml::from_str(&text).expect("toml");
    let secret = mount("secret");
    let password = raw["targets"][0]["password_file"]
        .as_str()
        .expect("password_file");
    assert!(
        password.starts_with(&secret),
        "{password} is not on the Secret's mount {secret}"
    );
    assert_eq!(raw["checks"]["files"][0].as_str(), Some("checks/*.toml"));
}

/// The YAML documents of a manifest file.
fn documents(relative: &str) -> Vec<serde_yaml::Value> {
    serde_yaml::Deserializer::from_str(&read(relative))
        .map(|d| serde::Deserialize::deserialize(d).expect("yaml"))
        .collect()
}

/// The StatefulSet variant: as many shards as pods, each pod's shard taken from its name
/// through the real shard parser, one peer URL per pod that resolves through the headless
/// Service to the container's port, the same install layout as the Deployment, and a
/// ServiceMonitor that scrapes every pod under the job the alert rules expect.
#[test]
fn the_sharded_kubernetes_manifests_agree() {
    let set = &documents("deploy/kubernetes/sharded/statefulset.yaml")[0];
    assert_eq!(set["kind"], "StatefulSet");
    let name = set["metadata"]["name"].as_str().expect("name");
    let replicas = set["spec"]["replicas"].as_u64().expect("replicas") as u32;
    assert!(replicas >= 2, "a split fleet");
    let pod = &set["spec"]["template"]["spec"];
    let container = &pod["containers"][0];

    // DEPLOYWATCH_SHARD as Kubernetes expands it for each pod: `$(POD_NAME)` is the pod's name.
    let env: Vec<&serde_yaml::Value> = container["env"]
        .as_sequence()
        .expect("env")
        .iter()
        .collect();
    let var = |wanted: &str| {
        env.iter()
            .find(|e| e["name"] == wanted)
            .copied()
            .unwrap_or_else(|| panic!("no {wanted} in the container's env"))
    };
    assert_eq!(
        var("POD_NAME")["valueFrom"]["fieldRef"]["fieldPath"],
        "metadata.name"
    );
    let shard_template = var("DEPLOYWATCH_SHARD")["value"].as_str().expect("value");
    for ordinal in 0..replicas {
        let expanded = shard_template.replace("$(POD_NAME)", &format!("{name}-{ordinal}"));
        let shard: deploywatch::shard::Shard = expanded
            .parse()
            .unwrap_or_else(|e| panic!("pod {name}-{ordinal}: {e}"));
        assert_eq!(
            (shard.index, shard.count),
            (ordinal, replicas),
            "pod {name}-{ordinal} runs shard {expanded}"
        );
    }

    // The same layout as the Deployment: configuration, packs, secret, state.
    let args = container_args(container);
    assert_eq!(config_option(&args), CONFIG);
    assert!(args.contains(&"run"));
    let mount = |wanted: &str| {
        container["volumeMounts"]
            .as_sequence()
            .expect("volumeMounts")
            .iter()
            .find(|m| m["name"] == wanted)
            .and_then(|m| m["mountPath"].as_str())
            .unwrap_or_else(|| panic!("no {wanted} mount"))
            .to_string()
    };
    assert_eq!(mount("config"), CONFIG);
    assert_eq!(mount("checks"), "/etc/deploywatch/checks");
    assert_eq!(mount("state"), STATE_DIR);
    let claims = set["spec"]["volumeClaimTemplates"]
        .as_sequence()
        .expect("a volume per pod: each shard keeps its own baselines");
    assert!(claims.iter().any(|c| c["metadata"]["name"] == "state"));
    let deployment: serde_yaml::Value =
        serde_yaml::from_str(&read("deploy/kubernetes/deployment.yaml")).expect("yaml");
    assert_eq!(
        pod["securityContext"], deployment["spec"]["template"]["spec"]["securityContext"],
        "the pods run as the image's user, like the Deployment's"
    );
    let port = container["ports"][0]["containerPort"]
        .as_u64()
        .expect("containerPort");

    // The headless Service that names every pod.
    let service = &documents("deploy/kubernetes/sharded/service.yaml")[0];
    let service_name = service["metadata"]["name"].as_str().expect("service name");
    assert_eq!(set["spec"]["serviceName"], service_name);
    assert_eq!(
        service["spec"]["clusterIP"], "None",
        "headless: a DNS name per pod"
    );
    assert_eq!(
        service["spec"]["selector"],
        set["spec"]["selector"]["matchLabels"]
    );
    assert_eq!(service["spec"]["ports"][0]["targetPort"], "http");
    assert_eq!(container["ports"][0]["name"], "http");

    // The configuration loads, keeps its state on the volume, and lists every pod as a peer,
    // in shard order.
    let maps = documents("deploy/kubernetes/sharded/configmap.yaml");
    let dir = configmap_config(&maps);
    assert!(shipped_store_path(&dir.main()).starts_with(STATE_DIR));
    let mut config = dir.load();
    let peers: Vec<String> = (0..replicas)
        .map(|i| format!("http://{name}-{i}.{service_name}:{port}"))
        .collect();
    assert_eq!(config.server.shard_peers, peers);
    let last = format!("{name}-{}/{replicas}", replicas - 1);
    config
        .apply_overrides(&deploywatch::config::Overrides {
            shard: Some(last.parse().expect("shard")),
        })
        .expect("the pods' shards fit the peers");
    let text = std::fs::read_to_string(dir.main()).expect("main file");
    let raw: toml::Value = toml::from_str(&text).expect("toml");
    let password = raw["targets"][0]["password_file"]
        .as_str()
        .expect("password_file");
    assert!(password.starts_with(&mount("secret")), "{password}");

    // Prometheus scrapes every pod through that Service, as job "deploywatch", the job the
    // shared rules' DeploywatchAbsent expects.
    let monitor = &documents("deploy/kubernetes/sharded/servicemonitor.yaml")[0];
    assert_eq!(monitor["kind"], "ServiceMonitor");
    let selector = monitor["spec"]["selector"]["matchLabels"]
        .as_mapping()
        .expect("matchLabels");
    for (key, value) in selector {
        assert_eq!(
            &service["metadata"]["labels"][key], value,
            "selects the Service"
        );
    }
    assert_eq!(monitor["spec"]["endpoints"][0]["port"], "http");
    assert_eq!(service_name, "deploywatch");
    let rules = read("deploy/prometheus/deploywatch-rules.yml");
    assert!(rules.contains("up{job=\"deploywatch\"}"));
    assert!(rules.contains("- alert: DeploywatchShardMissing"));
}

/// The HA variant: two StatefulSets whose pods pair up by ordinal, each pod's shard taken from
/// its name by the real parser, so every shard has exactly two pods; a configuration that loads
/// with a PostgreSQL store and no file, its password on the Secret's mount; one peer URL per
/// shard, each a Service on both pods of that shard; and the scrape of every pod.
#[test]
fn the_ha_kubernetes_manifests_agree() {
    let sets = documents("deploy/kubernetes/ha/statefulset.yaml");
    assert_eq!(
        sets.len(),
        2,
        "two StatefulSets: one pod of each pair in each"
    );
    let mut pods_per_shard = std::collections::BTreeMap::<u32, Vec<String>>::new();
    let mut counts = std::collections::BTreeSet::new();
    for set in &sets {
        assert_eq!(set["kind"], "StatefulSet");
        assert_eq!(set["spec"]["serviceName"], "deploywatch");
        assert!(
            set["spec"]["volumeClaimTemplates"].is_null(),
            "the pods keep nothing: the store is shared"
        );
        let name = set["metadata"]["name"].as_str().expect("name");
        let replicas = set["spec"]["replicas"].as_u64().expect("replicas") as u32;
        let container = &set["spec"]["template"]["spec"]["containers"][0];
        let shard_template = container["env"]
            .as_sequence()
            .expect("env")
            .iter()
            .find(|e| e["name"] == "DEPLOYWATCH_SHARD")
            .and_then(|e| e["value"].as_str())
            .expect("DEPLOYWATCH_SHARD");
        for ordinal in 0..replicas {
            let pod = format!("{name}-{ordinal}");
            let shard: deploywatch::shard::Shard = shard_template
                .replace("$(POD_NAME)", &pod)
                .parse()
                .unwrap_or_else(|e| panic!("pod {pod}: {e}"));
            assert_eq!(shard.index, ordinal, "pod {pod}");
            counts.insert(shard.count);
            pods_per_shard.entry(shard.index).or_default().push(pod);
        }
        assert_eq!(
            set["spec"]["template"]["metadata"]["labels"]["app"],
            "deploywatch"
        );
    }
    assert_eq!(counts.len(), 1, "both sets split the fleet alike");
    let shards = *counts.iter().next().expect("count");
    assert_eq!(pods_per_shard.len(), shards as usize);
    assert!(
        pods_per_shard.values().all(|pods| pods.len() == 2),
        "a pair per shard: {pods_per_shard:?}"
    );

    let services = documents("deploy/kubernetes/ha/service.yaml");
    let headless = services
        .iter()
        .find(|s| s["metadata"]["name"] == "deploywatch")
        .expect("the headless Service");
    assert_eq!(headless["spec"]["clusterIP"], "None");

    let dir = configmap_config(&documents("deploy/kubernetes/ha/configmap.yaml"));
    let config = dir.load();
    assert!(config.store.url.is_some(), "a shared PostgreSQL store");
    assert!(config.store.path.is_none());
    assert!(
        matches!(&config.store.password,
            Some(deploywatch::postgres::target::PasswordSource::File(p)) if p.starts_with("/etc/deploywatch/secret")),
        "{:?}",
        config.store.password
    );
    assert_eq!(config.server.shard_peers.len(), shards as usize);
    for (index, peer) in config.server.shard_peers.iter().enumerate() {
        let service = services
            .iter()
            .find(|s| {
                s["metadata"]["name"]
                    .as_str()
                    .is_some_and(|n| peer.starts_with(&format!("http://{n}:")))
            })
            .unwrap_or_else(|| panic!("no Service for {peer}"));
        let selector = &service["spec"]["selector"];
        assert_eq!(selector["app"], "deploywatch", "{peer}");
        assert_eq!(
            selector["apps.kubernetes.io/pod-index"].as_str(),
            Some(index.to_string().as_str()),
            "{peer} reaches both pods of shard {index}"
        );
    }
    let monitor = &documents("deploy/kubernetes/ha/servicemonitor.yaml")[0];
    assert_eq!(
        monitor["spec"]["selector"]["matchLabels"]["app"],
        "deploywatch"
    );
}
