//! Every manifest in `deploy/` parses and fits together. Each object has
//! `apiVersion`, `kind` and `metadata.name`, and the `DaemonSet`'s
//! references resolve. Its `ConfigMap` contains a config that the agent's
//! own parser accepts, and the scrape annotations, ports and mounts agree
//! with that config.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_yaml::Value;

/// One parsed object with the file it came from.
struct Object {
    file: String,
    value: Value,
}

impl Object {
    fn kind(&self) -> &str {
        self.value["kind"].as_str().unwrap_or_default()
    }

    fn name(&self) -> &str {
        self.value["metadata"]["name"].as_str().unwrap_or_default()
    }

    fn namespace(&self) -> Option<&str> {
        self.value["metadata"]["namespace"].as_str()
    }
}

fn deploy_dir() -> PathBuf {
    tokengate_tests::workspace_root().join("deploy")
}

fn load_objects() -> Vec<Object> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(deploy_dir())
        .expect("deploy/ exists")
        .map(|entry| entry.expect("directory entry").path())
        .filter(|path| {
            path.extension()
                .is_some_and(|ext| ext == "yaml" || ext == "yml")
        })
        .collect();
    files.sort();
    assert!(
        !files.is_empty(),
        "no manifests in {}",
        deploy_dir().display()
    );

    let mut objects = Vec::new();
    for path in files {
        let file = path
            .file_name()
            .expect("file name")
            .to_string_lossy()
            .into_owned();
        let text = std::fs::read_to_string(&path).expect("readable manifest");
        for (index, document) in serde_yaml::Deserializer::from_str(&text).enumerate() {
            let value = Value::deserialize(document).unwrap_or_else(|error| {
                panic!("{file}: document {index} is invalid YAML: {error}")
            });
            if value.is_null() {
                continue;
            }
            objects.push(Object {
                file: file.clone(),
                value,
            });
        }
    }
    objects
}

fn find<'a>(objects: &'a [Object], kind: &str, name: &str) -> Option<&'a Object> {
    objects
        .iter()
        .find(|object| object.kind() == kind && object.name() == name)
}

fn as_str<'a>(value: &'a Value, description: &str) -> &'a str {
    value
        .as_str()
        .unwrap_or_else(|| panic!("{description} is not a string: {value:?}"))
}

fn sequence<'a>(value: &'a Value, description: &str) -> &'a [Value] {
    value.as_sequence().map_or_else(
        || panic!("{description} is not a list: {value:?}"),
        Vec::as_slice,
    )
}

#[test]
fn every_object_has_kind_api_version_and_name() {
    let objects = load_objects();

    for object in &objects {
        let label = format!("{} ({})", object.file, object.kind());
        assert!(!object.kind().is_empty(), "{label}: kind is missing");
        let api_version = object.value["apiVersion"].as_str().unwrap_or_default();
        assert!(!api_version.is_empty(), "{label}: apiVersion is missing");
        assert!(
            !object.name().is_empty(),
            "{label}: metadata.name is missing"
        );
    }
    let mut seen = BTreeMap::new();
    for object in &objects {
        let key = (
            object.kind().to_owned(),
            object.namespace().map(str::to_owned),
            object.name().to_owned(),
        );
        if let Some(previous) = seen.insert(key, object.file.clone()) {
            panic!(
                "{} {} is defined in {previous} and in {}",
                object.kind(),
                object.name(),
                object.file
            );
        }
    }
}

/// Kinds that belong to no namespace.
const CLUSTER_SCOPED: [&str; 3] = ["Namespace", "ClusterRole", "ClusterRoleBinding"];

#[test]
fn namespaced_objects_use_a_defined_namespace() {
    let objects = load_objects();
    let namespaces: Vec<&str> = objects
        .iter()
        .filter(|object| object.kind() == "Namespace")
        .map(Object::name)
        .collect();
    if namespaces.is_empty() {
        return;
    }

    for object in objects
        .iter()
        .filter(|object| !CLUSTER_SCOPED.contains(&object.kind()))
    {
        let namespace = object.namespace().unwrap_or("default");
        assert!(
            namespaces.contains(&namespace),
            "{} {} is in namespace {namespace}, which deploy/ does not define",
            object.kind(),
            object.name()
        );
    }
}

/// Returns the only `DaemonSet` in deploy/.
fn daemonset(objects: &[Object]) -> &Object {
    let daemonsets: Vec<&Object> = objects
        .iter()
        .filter(|object| object.kind() == "DaemonSet")
        .collect();
    let [daemonset] = daemonsets.as_slice() else {
        panic!("{} DaemonSets in deploy/ instead of 1", daemonsets.len());
    };
    daemonset
}

/// Returns the container that runs the agent: the one started with
/// `--config`.
fn agent_container(pod: &Value) -> &Value {
    sequence(&pod["containers"], "containers")
        .iter()
        .find(|container| {
            sequence(&container["args"], "args")
                .iter()
                .any(|arg| arg.as_str() == Some("--config"))
        })
        .expect("a container runs the agent with --config")
}

/// Returns the volume mount whose directory contains `path`, and its volume.
fn volume_containing<'a>(
    pod: &'a Value,
    container: &'a Value,
    path: &Path,
) -> (&'a Value, &'a Value) {
    let mount = sequence(&container["volumeMounts"], "volumeMounts")
        .iter()
        .find(|mount| path.starts_with(as_str(&mount["mountPath"], "mountPath")))
        .unwrap_or_else(|| panic!("no volume is mounted where {} is", path.display()));
    let volume = sequence(&pod["volumes"], "volumes")
        .iter()
        .find(|volume| volume["name"] == mount["name"])
        .unwrap_or_else(|| panic!("volume {:?} is mounted but not defined", mount["name"]));
    (mount, volume)
}

/// Finds the agent's config file in the `ConfigMap` that the `DaemonSet`
/// mounts where `--config` points, and parses it with the agent's parser.
fn agent_config(objects: &[Object], pod: &Value) -> tokengate::config::Config {
    let agent = agent_container(pod);
    let args: Vec<&str> = sequence(&agent["args"], "args")
        .iter()
        .map(|arg| as_str(arg, "arg"))
        .collect();
    assert_eq!(args.first(), Some(&"run"), "the agent's subcommand");
    let config_index = args
        .iter()
        .position(|arg| *arg == "--config")
        .expect("--config");
    let config_path = Path::new(args.get(config_index + 1).expect("a path after --config"));

    let (mount, volume) = volume_containing(pod, agent, config_path);
    let config_map_name = as_str(&volume["configMap"]["name"], "configMap.name");
    let config_map = find(objects, "ConfigMap", config_map_name)
        .unwrap_or_else(|| panic!("ConfigMap {config_map_name} is not in deploy/"));
    let key = config_path
        .strip_prefix(as_str(&mount["mountPath"], "mountPath"))
        .expect("config path below the mount")
        .to_string_lossy()
        .into_owned();
    let text = as_str(
        &config_map.value["data"][key.as_str()],
        "the config in the ConfigMap",
    );

    let origin = format!("{}: data.{key}", config_map.file);
    tokengate::config::parse(text, &origin)
        .unwrap_or_else(|error| panic!("the sample config does not parse: {error}"))
}

#[test]
fn daemonset_references_resolve() {
    let objects = load_objects();
    let pod = &daemonset(&objects).value["spec"]["template"]["spec"];

    let account = pod["serviceAccountName"]
        .as_str()
        .expect("the DaemonSet names a ServiceAccount");

    assert!(
        find(&objects, "ServiceAccount", account).is_some(),
        "ServiceAccount {account} is not in deploy/"
    );
    for volume in sequence(&pod["volumes"], "volumes") {
        if let Some(name) = volume["configMap"]["name"].as_str() {
            assert!(
                find(&objects, "ConfigMap", name).is_some(),
                "ConfigMap {name} is not in deploy/"
            );
        }
    }
}

#[test]
fn sample_config_parses_with_agent_parser() {
    let objects = load_objects();
    let pod = &daemonset(&objects).value["spec"]["template"]["spec"];

    let config = agent_config(&objects, pod);

    assert!(
        !config.issuers.is_empty(),
        "the sample config has no issuer"
    );
    let selectors = config
        .enrollment
        .as_ref()
        .map_or(0, |enrollment| enrollment.selectors.len());
    assert!(
        !config.workloads.is_empty() || selectors > 0,
        "the sample config protects nothing: no workload and no pod selector"
    );
}

#[test]
fn agent_may_read_pods_and_nothing_else() {
    let objects = load_objects();
    let pod = &daemonset(&objects).value["spec"]["template"]["spec"];
    let account = as_str(&pod["serviceAccountName"], "serviceAccountName");
    let namespace = daemonset(&objects).namespace().unwrap_or("default");

    let binding = objects
        .iter()
        .filter(|object| object.kind() == "ClusterRoleBinding")
        .find(|object| {
            sequence(&object.value["subjects"], "subjects")
                .iter()
                .any(|subject| {
                    subject["kind"].as_str() == Some("ServiceAccount")
                        && subject["name"].as_str() == Some(account)
                        && subject["namespace"].as_str() == Some(namespace)
                })
        })
        .expect("a ClusterRoleBinding names the agent's ServiceAccount");
    let role_name = as_str(&binding.value["roleRef"]["name"], "roleRef.name");
    let role = find(&objects, "ClusterRole", role_name)
        .unwrap_or_else(|| panic!("ClusterRole {role_name} is not in deploy/"));

    let rules = sequence(&role.value["rules"], "rules");
    assert_eq!(rules.len(), 1, "the agent's role has more than one rule");
    let list = |field: &str| -> Vec<&str> {
        sequence(&rules[0][field], field)
            .iter()
            .map(|item| as_str(item, field))
            .collect()
    };
    assert_eq!(list("resources"), ["pods"]);
    assert_eq!(list("verbs"), ["get"]);
    assert_ne!(
        pod["automountServiceAccountToken"].as_bool(),
        Some(false),
        "the agent needs its service-account token to read pods"
    );
}

#[test]
fn daemonset_matches_sample_config() {
    let objects = load_objects();
    let template = &daemonset(&objects).value["spec"]["template"];
    let pod = &template["spec"];
    let agent = agent_container(pod);
    let config = agent_config(&objects, pod);

    // Scraping and probes reach the admin listener that the config sets.
    let admin_port = config.admin.listen.port().to_string();
    let annotations = &template["metadata"]["annotations"];
    assert_eq!(annotations["prometheus.io/scrape"].as_str(), Some("true"));
    assert_eq!(
        annotations["prometheus.io/port"].as_str(),
        Some(admin_port.as_str())
    );
    for probe in ["livenessProbe", "readinessProbe"] {
        let port = &agent[probe]["httpGet"]["port"];
        assert_eq!(
            port.as_u64().map(|port| port.to_string()),
            Some(admin_port.clone()),
            "{probe} does not use the admin port {admin_port}: {port:?}"
        );
    }
    // A port entry would become a host port under hostNetwork, and the
    // surge pod of an upgrade could then not be scheduled on the node.
    assert!(
        agent["ports"].as_sequence().is_none_or(Vec::is_empty),
        "the agent container declares ports"
    );
    let strategy = &daemonset(&objects).value["spec"]["updateStrategy"]["rollingUpdate"];
    assert_eq!(
        strategy["maxSurge"].as_u64(),
        Some(1),
        "hand-off needs a surge pod"
    );
    assert_eq!(strategy["maxUnavailable"].as_u64(), Some(0));

    // The CNI socket, the pod state and the hand-off socket are on the
    // node, where the plugin and the next agent pod find them.
    let enrollment = config.enrollment.as_ref().expect("the sample enrols pods");
    let handoff = config
        .interception
        .handoff
        .socket_path(&config.interception.pin_path);
    for path in [&enrollment.socket, &enrollment.state_dir, &handoff] {
        let (_, volume) = volume_containing(pod, agent, path);
        assert!(
            volume["hostPath"]["path"].as_str().is_some(),
            "{} is not on a hostPath volume",
            path.display()
        );
    }

    // The pins live in the node's bpffs, mounted from the host.
    let (_, pin_volume) = volume_containing(pod, agent, &config.interception.pin_path);
    assert!(
        pin_volume["hostPath"]["path"].as_str().is_some(),
        "the pin volume is not a hostPath"
    );
}

#[test]
fn agent_container_names_its_capabilities() {
    let objects = load_objects();
    let daemonset = objects
        .iter()
        .find(|object| object.kind() == "DaemonSet")
        .expect("a DaemonSet");
    let containers = sequence(
        &daemonset.value["spec"]["template"]["spec"]["containers"],
        "containers",
    );

    for container in containers {
        let name = container["name"].as_str().unwrap_or("unnamed");
        let security = &container["securityContext"];
        assert_ne!(
            security["privileged"].as_bool(),
            Some(true),
            "container {name} is privileged"
        );
        let added: Vec<&str> = security["capabilities"]["add"]
            .as_sequence()
            .map(|caps| caps.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        for needed in ["BPF", "NET_ADMIN"] {
            assert!(
                added.contains(&needed),
                "container {name} does not add {needed}: {added:?}"
            );
        }
    }
}
