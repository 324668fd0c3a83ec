//! The `tokengate-cni` chained plugin: reads the CNI environment and the
//! network configuration, forwards ADD, DEL, CHECK, GC and STATUS to the
//! agent over its Unix socket, and writes the result or a CNI error.
//!
//! The protocol is the CNI specification 1.1. The operation is in
//! `CNI_COMMAND`, the pod sandbox in `CNI_CONTAINERID`, `CNI_NETNS` and
//! `CNI_IFNAME`, and the Kubernetes pod in `CNI_ARGS`. The configuration
//! comes on standard input. The result (the previous plugin's, unchanged)
//! or an error object goes to standard output.

use std::io::{BufRead as _, BufReader, Write as _};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;
use serde_json::{json, Value};

use super::protocol::{AgentRequest, AgentResponse, Operation, Outcome, PodRef, MAX_MESSAGE_BYTES};

/// CNI specification versions whose configuration and result this plugin
/// handles. It changes no field of the result, so every version since
/// chaining got `prevResult` (0.3.0) works alike.
pub const SUPPORTED_VERSIONS: [&str; 5] = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];

/// Version used in VERSION output and in errors raised before the
/// configuration is read.
const LATEST_VERSION: &str = "1.1.0";

/// Time the plugin waits for the agent's response, in seconds. An ADD waits
/// for the pod lookup in the Kubernetes API (5 s by default) and the
/// attachment; 30 s leaves room for a slow API server and is far below the
/// kubelet's 4-minute runtime request timeout.
pub const DEFAULT_TIMEOUT_SECONDS: u64 = 30;

/// CNI error codes (specification 1.1, "Error").
pub mod codes {
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    pub const INVALID_ENVIRONMENT: u32 = 4;
    pub const DECODE_FAILED: u32 = 6;
    pub const INVALID_CONFIG: u32 = 7;
    /// A transient condition; the runtime retries later.
    pub const TRY_AGAIN_LATER: u32 = 11;
    /// STATUS: the plugin cannot serve ADD now.
    pub const NOT_AVAILABLE: u32 = 50;
}

/// The plugin's network configuration: the standard fields and its own.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct NetConf {
    cni_version: String,
    #[serde(default)]
    prev_result: Option<Value>,
    /// The agent's socket (`enrollment.socket` in its configuration).
    #[serde(default = "default_agent_socket")]
    agent_socket: PathBuf,
    /// Kubernetes namespaces whose pods pass without asking the agent.
    #[serde(default)]
    exclude_namespaces: Vec<String>,
    /// Time to wait for the agent's response, in seconds.
    #[serde(default = "default_timeout_seconds")]
    timeout_seconds: u64,
    /// GC only: the attachments the runtime still has.
    #[serde(default, rename = "cni.dev/valid-attachments")]
    valid_attachments: Vec<Attachment>,
}

#[derive(Debug, Deserialize)]
struct Attachment {
    #[serde(rename = "containerID")]
    container_id: String,
}

fn default_agent_socket() -> PathBuf {
    PathBuf::from(crate::config::DEFAULT_CNI_SOCKET)
}
fn default_timeout_seconds() -> u64 {
    DEFAULT_TIMEOUT_SECONDS
}

/// A CNI error object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CniError {
    pub code: u32,
    pub msg: String,
    pub details: String,
}

impl CniError {
    fn new(code: u32, msg: impl Into<String>, details: impl Into<String>) -> Self {
        Self {
            code,
            msg: msg.into(),
            details: details.into(),
        }
    }
}

/// Output and exit code of one invocation.
#[derive(Debug, Default)]
pub struct PluginOutput {
    /// Text for standard output, if any.
    pub stdout: Option<String>,
    /// Lines for standard error: notes for the runtime's log.
    pub stderr: Vec<String>,
    /// Process exit code: 0 on success.
    pub exit_code: u8,
}

/// Runs one invocation. `env` returns the value of an environment
/// variable, so tests never change the process environment.
pub fn run(env: &dyn Fn(&str) -> Option<String>, stdin: &[u8]) -> PluginOutput {
    let mut output = PluginOutput::default();
    let command = env("CNI_COMMAND").unwrap_or_default();

    if command == "VERSION" {
        output.stdout = Some(
            json!({"cniVersion": LATEST_VERSION, "supportedVersions": SUPPORTED_VERSIONS})
                .to_string(),
        );
        return output;
    }

    let conf: NetConf = match serde_json::from_slice(stdin) {
        Ok(conf) => conf,
        Err(error) => {
            return error_output(
                LATEST_VERSION,
                &CniError::new(
                    codes::DECODE_FAILED,
                    "invalid network configuration on standard input",
                    error.to_string(),
                ),
            )
        }
    };
    if !SUPPORTED_VERSIONS.contains(&conf.cni_version.as_str()) {
        return error_output(
            LATEST_VERSION,
            &CniError::new(
                codes::INCOMPATIBLE_VERSION,
                format!("cniVersion {} is not supported", conf.cni_version),
                format!("use one of {}", SUPPORTED_VERSIONS.join(", ")),
            ),
        );
    }

    let result = match command.as_str() {
        "ADD" => add(env, &conf, &mut output.stderr),
        "DEL" => del(env, &conf, &mut output.stderr).map(|()| None),
        "CHECK" => check(env, &conf).map(|()| None),
        "STATUS" => status(&conf).map(|()| None),
        "GC" => gc(&conf).map(|()| None),
        other => Err(CniError::new(
            codes::INVALID_ENVIRONMENT,
            format!("unknown CNI_COMMAND {other:?}"),
            "expected ADD, DEL, CHECK, GC, STATUS or VERSION",
        )),
    };
    match result {
        Ok(stdout) => {
            output.stdout = stdout;
            output
        }
        Err(error) => {
            let mut failed = error_output(&conf.cni_version, &error);
            failed.stderr.append(&mut output.stderr);
            failed
        }
    }
}

/// ADD: requests the agent to enrol the pod and passes the previous result on
/// once it has, or right away for a pod the agent is not asked about.
fn add(
    env: &dyn Fn(&str) -> Option<String>,
    conf: &NetConf,
    notes: &mut Vec<String>,
) -> Result<Option<String>, CniError> {
    let container_id = required(env, "CNI_CONTAINERID")?;
    let netns = required(env, "CNI_NETNS")?;
    let ifname = required(env, "CNI_IFNAME")?;
    let result = pass_through(conf);

    let Some(pod) = pod_from_args(env) else {
        notes.push(
            "no K8S_POD_NAMESPACE and K8S_POD_NAME in CNI_ARGS, not a Kubernetes pod: passed"
                .to_owned(),
        );
        return Ok(Some(result));
    };
    if conf.exclude_namespaces.contains(&pod.namespace) {
        return Ok(Some(result));
    }

    let request = AgentRequest {
        operation: Operation::Add,
        container_id,
        netns: Some(PathBuf::from(netns)),
        ifname,
        pod: Some(pod),
        valid_container_ids: Vec::new(),
    };
    // Fail closed: an agent that cannot be reached or fails to enrol fails
    // the ADD, and the runtime retries the sandbox.
    let response = call(conf, &request).map_err(|error| {
        CniError::new(
            codes::TRY_AGAIN_LATER,
            "tokengate agent unreachable; the pod starts once the agent enrols it",
            error,
        )
    })?;
    match response.outcome {
        Outcome::Failed => Err(CniError::new(
            codes::TRY_AGAIN_LATER,
            "tokengate agent failed to enrol the pod",
            response.message,
        )),
        Outcome::Enrolled | Outcome::NotSelected | Outcome::Done => Ok(Some(result)),
    }
}

/// DEL: requests the agent to release the pod. An unreachable agent is not an
/// error, because DEL must succeed when there is nothing left to do, and a
/// restarted agent releases pods whose namespace is gone by itself.
fn del(
    env: &dyn Fn(&str) -> Option<String>,
    conf: &NetConf,
    notes: &mut Vec<String>,
) -> Result<(), CniError> {
    let container_id = required(env, "CNI_CONTAINERID")?;
    let pod = pod_from_args(env);
    if pod
        .as_ref()
        .is_some_and(|pod| conf.exclude_namespaces.contains(&pod.namespace))
    {
        return Ok(());
    }

    let request = AgentRequest {
        operation: Operation::Del,
        container_id,
        netns: env("CNI_NETNS")
            .filter(|netns| !netns.is_empty())
            .map(PathBuf::from),
        ifname: env("CNI_IFNAME").unwrap_or_default(),
        pod,
        valid_container_ids: Vec::new(),
    };
    match call(conf, &request) {
        Ok(response) if response.outcome == Outcome::Failed => Err(CniError::new(
            codes::TRY_AGAIN_LATER,
            "tokengate agent failed to release the pod",
            response.message,
        )),
        Ok(_) => Ok(()),
        Err(error) => {
            notes.push(format!("tokengate agent unreachable at DEL, the agent releases the pod when it finds the namespace gone: {error}"));
            Ok(())
        }
    }
}

/// CHECK: fails when the pod should be enrolled and is not.
fn check(env: &dyn Fn(&str) -> Option<String>, conf: &NetConf) -> Result<(), CniError> {
    let container_id = required(env, "CNI_CONTAINERID")?;
    let netns = required(env, "CNI_NETNS")?;
    let Some(pod) = pod_from_args(env) else {
        return Ok(());
    };
    if conf.exclude_namespaces.contains(&pod.namespace) {
        return Ok(());
    }

    let request = AgentRequest {
        operation: Operation::Check,
        container_id,
        netns: Some(PathBuf::from(netns)),
        ifname: env("CNI_IFNAME").unwrap_or_default(),
        pod: Some(pod),
        valid_container_ids: Vec::new(),
    };
    let response = call(conf, &request).map_err(|error| {
        CniError::new(codes::TRY_AGAIN_LATER, "tokengate agent unreachable", error)
    })?;
    if response.outcome == Outcome::Failed {
        return Err(CniError::new(
            codes::TRY_AGAIN_LATER,
            "pod is not protected as configured",
            response.message,
        ));
    }
    Ok(())
}

/// STATUS: the plugin can serve ADD only while the agent responds.
fn status(conf: &NetConf) -> Result<(), CniError> {
    let request = AgentRequest {
        operation: Operation::Status,
        container_id: String::new(),
        netns: None,
        ifname: String::new(),
        pod: None,
        valid_container_ids: Vec::new(),
    };
    match call(conf, &request) {
        Ok(response) if response.outcome != Outcome::Failed => Ok(()),
        Ok(response) => Err(CniError::new(
            codes::NOT_AVAILABLE,
            "tokengate agent not ready",
            response.message,
        )),
        Err(error) => Err(CniError::new(
            codes::NOT_AVAILABLE,
            "tokengate agent unreachable",
            error,
        )),
    }
}

/// GC: releases pods of sandboxes that the runtime no longer has.
fn gc(conf: &NetConf) -> Result<(), CniError> {
    let request = AgentRequest {
        operation: Operation::Gc,
        container_id: String::new(),
        netns: None,
        ifname: String::new(),
        pod: None,
        valid_container_ids: conf
            .valid_attachments
            .iter()
            .map(|attachment| attachment.container_id.clone())
            .collect(),
    };
    let response = call(conf, &request).map_err(|error| {
        CniError::new(codes::TRY_AGAIN_LATER, "tokengate agent unreachable", error)
    })?;
    if response.outcome == Outcome::Failed {
        return Err(CniError::new(
            codes::TRY_AGAIN_LATER,
            "tokengate agent failed to release stale pods",
            response.message,
        ));
    }
    Ok(())
}

/// Sends `request` to the agent and reads its response. Errors are text for
/// the `details` of a CNI error.
fn call(conf: &NetConf, request: &AgentRequest) -> Result<AgentResponse, String> {
    let socket = &conf.agent_socket;
    let timeout = Duration::from_secs(conf.timeout_seconds.max(1));
    let failed =
        |what: &str, error: &dyn std::fmt::Display| format!("{what} {}: {error}", socket.display());

    let mut stream =
        UnixStream::connect(socket).map_err(|error| failed("failed to connect to", &error))?;
    stream
        .set_read_timeout(Some(timeout))
        .and_then(|()| stream.set_write_timeout(Some(timeout)))
        .map_err(|error| failed("failed to set timeouts on", &error))?;

    let mut line = serde_json::to_vec(request)
        .map_err(|error| failed("failed to encode the request to", &error))?;
    line.push(b'\n');
    stream
        .write_all(&line)
        .map_err(|error| failed("failed to send the request to", &error))?;

    let mut answer = String::new();
    let read = BufReader::new(std::io::Read::take(stream, MAX_MESSAGE_BYTES as u64))
        .read_line(&mut answer)
        .map_err(|error| failed("no answer within the timeout from", &error))?;
    if read == 0 {
        return Err(failed(
            "connection closed without an answer by",
            &"end of stream",
        ));
    }
    serde_json::from_str(&answer).map_err(|error| failed("invalid answer from", &error))
}

/// Returns the previous plugin's result, unchanged except that a missing
/// `cniVersion` is filled in, or an empty result when this plugin runs
/// first.
fn pass_through(conf: &NetConf) -> String {
    let mut result = conf.prev_result.clone().unwrap_or_else(|| json!({}));
    if let Value::Object(fields) = &mut result {
        fields
            .entry("cniVersion")
            .or_insert_with(|| Value::String(conf.cni_version.clone()));
    }
    result.to_string()
}

fn required(env: &dyn Fn(&str) -> Option<String>, name: &str) -> Result<String, CniError> {
    env(name).filter(|value| !value.is_empty()).ok_or_else(|| {
        CniError::new(
            codes::INVALID_ENVIRONMENT,
            format!("missing {name}"),
            "the runtime sets it for this command",
        )
    })
}

/// Parses `K8S_POD_NAMESPACE`, `K8S_POD_NAME` and `K8S_POD_UID` out of
/// `CNI_ARGS` (`KEY=VALUE` pairs separated by `;`).
fn pod_from_args(env: &dyn Fn(&str) -> Option<String>) -> Option<PodRef> {
    let args = env("CNI_ARGS")?;
    let mut namespace = None;
    let mut name = None;
    let mut uid = None;
    for pair in args.split(';') {
        match pair.split_once('=') {
            Some(("K8S_POD_NAMESPACE", value)) => namespace = Some(value.to_owned()),
            Some(("K8S_POD_NAME", value)) => name = Some(value.to_owned()),
            Some(("K8S_POD_UID", value)) if !value.is_empty() => uid = Some(value.to_owned()),
            _ => {}
        }
    }
    Some(PodRef {
        namespace: namespace.filter(|value| !value.is_empty())?,
        name: name.filter(|value| !value.is_empty())?,
        uid,
    })
}

fn error_output(version: &str, error: &CniError) -> PluginOutput {
    PluginOutput {
        stdout: Some(
            json!({
                "cniVersion": version,
                "code": error.code,
                "msg": error.msg,
                "details": error.details,
            })
            .to_string(),
        ),
        stderr: vec![format!("tokengate-cni: {}: {}", error.msg, error.details)],
        exit_code: 1,
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::os::unix::net::UnixListener;

    use std::path::Path;

    use super::*;

    fn env_of(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(key, value)| ((*key).to_owned(), (*value).to_owned()))
            .collect();
        move |name| map.get(name).cloned()
    }

    fn conf(socket: &Path, extra: &str) -> Vec<u8> {
        format!(
            r#"{{"cniVersion":"1.0.0","name":"k8s","type":"tokengate-cni","agentSocket":"{}","timeoutSeconds":2,
               "prevResult":{{"cniVersion":"1.0.0","ips":[{{"address":"198.18.0.10/24"}}]}}{extra}}}"#,
            socket.display()
        )
        .into_bytes()
    }

    fn add_env(namespace: &str) -> Vec<(&'static str, String)> {
        vec![
            ("CNI_COMMAND", "ADD".to_owned()),
            ("CNI_CONTAINERID", "c0ffee".to_owned()),
            ("CNI_NETNS", "/var/run/netns/cni-1".to_owned()),
            ("CNI_IFNAME", "eth0".to_owned()),
            (
                "CNI_ARGS",
                format!("IgnoreUnknown=1;K8S_POD_NAMESPACE={namespace};K8S_POD_NAME=orders-1;K8S_POD_UID=u1"),
            ),
        ]
    }

    fn run_with(pairs: &[(&'static str, String)], stdin: &[u8]) -> PluginOutput {
        let borrowed: Vec<(&str, &str)> = pairs
            .iter()
            .map(|(key, value)| (*key, value.as_str()))
            .collect();
        run(&env_of(&borrowed), stdin)
    }

    /// Accepts one connection, sends `response` and returns the request.
    fn agent_once(socket: &Path, response: AgentResponse) -> std::thread::JoinHandle<AgentRequest> {
        let listener = UnixListener::bind(socket).unwrap();
        std::thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            let mut line = String::new();
            BufReader::new(&stream).read_line(&mut line).unwrap();
            let mut writer = &stream;
            writer
                .write_all(format!("{}\n", serde_json::to_string(&response).unwrap()).as_bytes())
                .unwrap();
            serde_json::from_str(&line).unwrap()
        })
    }

    #[test]
    fn version_lists_supported_versions() {
        let output = run(&env_of(&[("CNI_COMMAND", "VERSION")]), b"");

        let value: Value = serde_json::from_str(&output.stdout.unwrap()).unwrap();
        assert_eq!(output.exit_code, 0);
        assert_eq!(value["cniVersion"], LATEST_VERSION);
        assert_eq!(
            value["supportedVersions"].as_array().unwrap().len(),
            SUPPORTED_VERSIONS.len()
        );
    }

    #[test]
    fn add_forwards_pod_and_passes_prev_result() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("cni.sock");
        let agent = agent_once(
            &socket,
            AgentResponse {
                outcome: Outcome::Enrolled,
                workload: Some("shop_orders-1".to_owned()),
                selector: Some("shop".to_owned()),
                message: String::new(),
            },
        );

        let output = run_with(&add_env("shop"), &conf(&socket, ""));

        let request = agent.join().unwrap();
        assert_eq!(output.exit_code, 0, "{output:?}");
        assert_eq!(request.operation, Operation::Add);
        assert_eq!(request.container_id, "c0ffee");
        assert_eq!(request.pod.unwrap().uid.as_deref(), Some("u1"));
        let result: Value = serde_json::from_str(&output.stdout.unwrap()).unwrap();
        assert_eq!(result["ips"][0]["address"], "198.18.0.10/24");
    }

    #[test]
    fn add_fails_when_agent_unreachable() {
        let dir = tempfile::tempdir().unwrap();

        let output = run_with(&add_env("shop"), &conf(&dir.path().join("absent.sock"), ""));

        let error: Value = serde_json::from_str(&output.stdout.unwrap()).unwrap();
        assert_eq!(output.exit_code, 1);
        assert_eq!(error["code"], codes::TRY_AGAIN_LATER);
        assert_eq!(error["cniVersion"], "1.0.0");
    }

    #[test]
    fn add_in_excluded_namespace_skips_agent() {
        let dir = tempfile::tempdir().unwrap();

        let output = run_with(
            &add_env("kube-system"),
            &conf(
                &dir.path().join("absent.sock"),
                r#","excludeNamespaces":["kube-system"]"#,
            ),
        );

        assert_eq!(output.exit_code, 0, "{output:?}");
    }

    #[test]
    fn del_succeeds_when_agent_unreachable() {
        let dir = tempfile::tempdir().unwrap();
        let mut env = add_env("shop");
        env[0].1 = "DEL".to_owned();

        let output = run_with(&env, &conf(&dir.path().join("absent.sock"), ""));

        assert_eq!(output.exit_code, 0, "{output:?}");
        assert!(output.stdout.is_none());
        assert_eq!(output.stderr.len(), 1);
    }

    #[test]
    fn unsupported_version_is_error_1() {
        let stdin = br#"{"cniVersion":"0.2.0","name":"k8s","type":"tokengate-cni"}"#;

        let output = run_with(&add_env("shop"), stdin);

        let error: Value = serde_json::from_str(&output.stdout.unwrap()).unwrap();
        assert_eq!(error["code"], codes::INCOMPATIBLE_VERSION);
        assert_eq!(output.exit_code, 1);
    }

    #[test]
    fn missing_environment_is_error_4() {
        let dir = tempfile::tempdir().unwrap();
        let env = vec![("CNI_COMMAND", "ADD".to_owned())];

        let output = run_with(&env, &conf(&dir.path().join("absent.sock"), ""));

        let error: Value = serde_json::from_str(&output.stdout.unwrap()).unwrap();
        assert_eq!(error["code"], codes::INVALID_ENVIRONMENT);
    }

    #[test]
    fn pod_args_parse() {
        let pod = pod_from_args(&env_of(&[(
            "CNI_ARGS",
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=orders-1;K8S_POD_INFRA_CONTAINER_ID=x",
        )]))
        .unwrap();

        assert_eq!(pod.namespace, "shop");
        assert_eq!(pod.name, "orders-1");
        assert_eq!(pod.uid, None);
        assert!(pod_from_args(&env_of(&[("CNI_ARGS", "IgnoreUnknown=1")])).is_none());
    }
}
