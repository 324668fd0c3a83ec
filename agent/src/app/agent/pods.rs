//! Pods enrolled through the CNI plugin: the agent's main task enrols,
//! releases and adopts them, one request at a time, through the same
//! [`Enroll`] path as static workloads.
//!
//! Each enrolled pod has a state file. The file is written before the pod
//! is enrolled and removed after it is released, so a crash in between
//! leaves a file that the next sweep acts on, never pins without a file.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use super::{Agent, Enroll, Protected};
use crate::cni::protocol::{AgentRequest, AgentResponse, Operation, Outcome};
use crate::config::{EnrollmentConfig, SelectorConfig};
use crate::enrollment::{
    self, namespace_filter, probe_rules, server, workload_name, KubeClient, NamespaceFilter, Pod,
    PodRecord, PodRequest, StateDir, STATE_VERSION,
};
use crate::proxy::{DrainController, ProxySlot};

/// Capacity of the queue from the socket's connection tasks to the main
/// task. Requests beyond it wait in their connection, which the plugin's
/// timeout bounds.
const REQUEST_QUEUE: usize = 64;

/// Sweep period while enrolment is off: the sweep then has nothing to do.
const IDLE_SWEEP: Duration = Duration::from_secs(3600);

/// One pod enrolled through the plugin.
pub(super) struct EnrolledPod<T> {
    record: PodRecord,
    protected: Protected<T>,
}

/// The enrolled pods and what serves the plugin.
pub(super) struct Pods<T> {
    enrolled: Vec<EnrolledPod<T>>,
    state: Option<StateDir>,
    requests: Option<mpsc::Receiver<PodRequest>>,
    server: Option<JoinHandle<()>>,
    /// Namespaces the selectors in force can match, for the socket server.
    namespaces: Option<watch::Sender<NamespaceFilter>>,
}

impl<T> Default for Pods<T> {
    fn default() -> Self {
        Self {
            enrolled: Vec::new(),
            state: None,
            requests: None,
            server: None,
            namespaces: None,
        }
    }
}

impl<T> Pods<T> {
    /// Takes the request queue for the duration of `Agent::watch`.
    pub(super) fn take_requests(&mut self) -> Option<mpsc::Receiver<PodRequest>> {
        self.requests.take()
    }

    pub(super) fn restore_requests(&mut self, requests: Option<mpsc::Receiver<PodRequest>>) {
        self.requests = requests;
    }

    /// Stops taking plugin requests and returns the enrolled pods, for
    /// shutdown. Their pins and state files stay for the next agent.
    pub(super) fn into_protected(self) -> Vec<Protected<T>> {
        if let Some(server) = self.server {
            server.abort();
        }
        self.enrolled.into_iter().map(|pod| pod.protected).collect()
    }
}

/// Waits for the next plugin request; never completes without a queue.
pub(super) async fn next_request(
    requests: &mut Option<mpsc::Receiver<PodRequest>>,
) -> Option<PodRequest> {
    match requests {
        Some(requests) => requests.recv().await,
        None => std::future::pending().await,
    }
}

/// Returns the interval of the sweep for pods whose namespace is gone.
pub(super) fn sweep_interval(enrollment: Option<&EnrollmentConfig>) -> tokio::time::Interval {
    let period = enrollment.map_or(IDLE_SWEEP, |enrollment| {
        Duration::from_secs(enrollment.sweep_seconds)
    });
    let mut interval = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    interval
}

impl<E: Enroll> Agent<E> {
    /// Starts pod enrolment when the configuration has an `enrollment`
    /// section: adopts the pods in the state directory, then listens for
    /// the plugin. Adoption comes first, so a plugin request never races it.
    pub async fn start_enrollment(&mut self) -> anyhow::Result<()> {
        let Some(enrollment) = self.running.config.enrollment.clone() else {
            return Ok(());
        };
        let state = StateDir::open(&enrollment.state_dir)?;
        self.pods.state = Some(state);
        self.sweep_pods().await;

        let host = std::env::var("KUBERNETES_SERVICE_HOST").ok();
        let port = std::env::var("KUBERNETES_SERVICE_PORT").ok();
        let kube = KubeClient::new(&enrollment.kubernetes, host.as_deref(), port.as_deref())?;
        let listener = server::bind(&enrollment.socket)?;
        let owner_uid = std::os::unix::fs::MetadataExt::uid(
            &std::fs::metadata(&enrollment.socket).with_context(|| {
                format!("while reading the owner of {}", enrollment.socket.display())
            })?,
        );
        let (sender, receiver) = mpsc::channel(REQUEST_QUEUE);
        let (namespaces, filter) = watch::channel(namespace_filter(&enrollment.selectors));
        self.pods.requests = Some(receiver);
        self.pods.namespaces = Some(namespaces);
        self.pods.server = Some(tokio::spawn(server::serve(
            listener, owner_uid, kube, filter, sender,
        )));
        tracing::info!(
            socket = %enrollment.socket.display(),
            state_dir = %enrollment.state_dir.display(),
            adopted = self.pods.enrolled.len(),
            selectors = enrollment.selectors.len(),
            "pod enrolment started"
        );
        Ok(())
    }

    /// Returns how many pods are enrolled through the plugin.
    pub fn enrolled_pods(&self) -> usize {
        self.pods.enrolled.len()
    }

    /// Carries out one plugin request and sends the response.
    pub(super) async fn handle_pod_request(&mut self, request: PodRequest) {
        let PodRequest {
            request,
            pod,
            reply,
        } = request;
        let response = match request.operation {
            Operation::Add => self.add_pod(&request, pod).await,
            Operation::Check => self.check_pod(&request, pod.as_ref()),
            Operation::Del => self.del_pod(&request.container_id),
            Operation::Gc => self.gc_pods(&request.valid_container_ids),
            Operation::Status => AgentResponse::done("agent running"),
        };
        if response.outcome == Outcome::Failed {
            tracing::error!(
                operation = ?request.operation,
                container_id = %request.container_id,
                error = %response.message,
                "CNI request failed"
            );
        }
        // The plugin may have timed out; the runtime then retries.
        let _ = reply.send(response);
    }

    /// Enrols the pod of an ADD when a selector matches it. The response
    /// goes out once its protected ports are steered.
    async fn add_pod(&mut self, request: &AgentRequest, pod: Option<Pod>) -> AgentResponse {
        let (Some(pod), Some(netns)) = (pod, request.netns.clone()) else {
            return AgentResponse::failed("ADD without a pod or a network namespace");
        };
        if let Some(enrolled) = self.pod_by_container(&request.container_id) {
            // A repeated ADD for the same sandbox: already done.
            return enrolled_response(&enrolled.record);
        }
        // NOTE: labels and annotations are read once, here. A pod relabelled
        // later keeps the selector it matched at ADD until it is deleted.
        let Some(selector) = self.selector_for(&pod) else {
            tracing::info!(pod.namespace = %pod.metadata.namespace, pod.name = %pod.metadata.name, "pod matches no selector, not enrolled");
            return not_selected();
        };

        let workload = workload_name(&pod.metadata.namespace, &pod.metadata.name);
        if self
            .running
            .config
            .workloads
            .iter()
            .any(|static_workload| static_workload.name == workload)
        {
            return AgentResponse::failed(format!(
                "pod workload name {workload} is taken by a static workload; rename that workload"
            ));
        }
        // A new sandbox of the same pod replaces the old one.
        if let Some(index) = self
            .pods
            .enrolled
            .iter()
            .position(|enrolled| enrolled.record.workload == workload)
        {
            let old = self.pods.enrolled.swap_remove(index);
            tracing::info!(workload = %workload, container_id = %old.record.container_id, "pod sandbox replaced, releasing the old one");
            if let Err(error) = self.release_pod(old) {
                return AgentResponse::failed(format!("{error:#}"));
            }
        }

        let probes = if selector.allow_probes {
            pod.probe_routes(&selector.ports)
        } else {
            Vec::new()
        };
        let record = PodRecord {
            version: STATE_VERSION,
            container_id: request.container_id.clone(),
            netns,
            ifname: request.ifname.clone(),
            namespace: pod.metadata.namespace.clone(),
            name: pod.metadata.name.clone(),
            uid: pod.metadata.uid.clone(),
            selector: selector.name.clone(),
            workload,
            probes,
        };
        match self.enroll_record(record, &selector).await {
            Ok(response) => response,
            Err(error) => AgentResponse::failed(format!("{error:#}")),
        }
    }

    /// Writes the state file of `record`, then enrols the pod. On failure
    /// the state file and any pins are removed again.
    async fn enroll_record(
        &mut self,
        record: PodRecord,
        selector: &SelectorConfig,
    ) -> anyhow::Result<AgentResponse> {
        let state = self
            .pods
            .state
            .clone()
            .context("pod enrolment is not started")?;
        state.write(&record)?;

        match self.protect_pod(&record, selector).await {
            Ok(protected) => {
                tracing::info!(
                    workload = %record.workload,
                    pod.namespace = %record.namespace,
                    pod.name = %record.name,
                    container_id = %record.container_id,
                    selector = %record.selector,
                    probes = record.probes.len(),
                    "pod enrolled"
                );
                let response = enrolled_response(&record);
                self.pods.enrolled.push(EnrolledPod { record, protected });
                Ok(response)
            }
            Err(error) => {
                if let Err(forget) = self.enroll.forget(&record.workload) {
                    tracing::warn!(workload = %record.workload, error = format!("{forget:#}"), "failed to remove the pins of a pod that failed to enrol");
                }
                state.remove(&record.container_id)?;
                Err(error)
            }
        }
    }

    /// Builds the pod's workload from its selector and enrols it.
    async fn protect_pod(
        &self,
        record: &PodRecord,
        selector: &SelectorConfig,
    ) -> anyhow::Result<Protected<E::Enrolled>> {
        let workload = selector.workload(
            record.workload.clone(),
            record.netns.clone(),
            probe_rules(&record.probes),
        );
        let slot = Arc::new(ProxySlot::new(self.core.workload_proxy(&workload)));
        let drain = DrainController::new();
        let enrolled = self
            .enroll
            .enroll(&self.core, &workload, Arc::clone(&slot), drain.handle())
            .await?;
        Ok(Protected {
            config: workload,
            slot,
            drain,
            enrolled,
        })
    }

    /// CHECK: fails when the pod should be enrolled and is not.
    fn check_pod(&self, request: &AgentRequest, pod: Option<&Pod>) -> AgentResponse {
        if let Some(enrolled) = self.pod_by_container(&request.container_id) {
            if !enrolled.record.netns.exists() {
                return AgentResponse::failed("the pod's network namespace is gone");
            }
            return enrolled_response(&enrolled.record);
        }
        match pod.and_then(|pod| self.selector_for(pod)) {
            Some(selector) => AgentResponse::failed(format!(
                "pod is selected by {} but not enrolled",
                selector.name
            )),
            None => not_selected(),
        }
    }

    /// DEL: releases the pod of `container_id` and removes its state file.
    /// A second DEL, or one for a pod that was never enrolled, finds
    /// nothing and succeeds.
    fn del_pod(&mut self, container_id: &str) -> AgentResponse {
        if let Some(index) = self
            .pods
            .enrolled
            .iter()
            .position(|enrolled| enrolled.record.container_id == container_id)
        {
            let pod = self.pods.enrolled.swap_remove(index);
            tracing::info!(workload = %pod.record.workload, container_id, "pod deleted, releasing it");
            return match self.release_pod(pod) {
                Ok(()) => AgentResponse::done("released"),
                Err(error) => AgentResponse::failed(format!("{error:#}")),
            };
        }

        // Not in memory: the pod may have failed adoption and left pins.
        let Some(state) = self.pods.state.clone() else {
            return AgentResponse::done("pod enrolment is off");
        };
        let Ok(path) = state.file(container_id) else {
            return AgentResponse::done("not enrolled");
        };
        match std::fs::read(&path) {
            Ok(text) => match serde_json::from_slice::<PodRecord>(&text) {
                Ok(record) => match self.forget_record(&state, &record) {
                    Ok(()) => AgentResponse::done("released"),
                    Err(error) => AgentResponse::failed(format!("{error:#}")),
                },
                Err(error) => AgentResponse::failed(format!(
                    "pod state file {} is not valid JSON ({error}); remove it",
                    path.display()
                )),
            },
            Err(_) => AgentResponse::done("not enrolled"),
        }
    }

    /// GC: releases every pod whose sandbox the runtime no longer has.
    fn gc_pods(&mut self, valid: &[String]) -> AgentResponse {
        let valid: HashSet<&str> = valid.iter().map(String::as_str).collect();
        let stale: Vec<String> = self
            .pods
            .enrolled
            .iter()
            .map(|enrolled| enrolled.record.container_id.clone())
            .filter(|container_id| !valid.contains(container_id.as_str()))
            .collect();
        let mut failures = Vec::new();
        for container_id in &stale {
            let response = self.del_pod(container_id);
            if response.outcome == Outcome::Failed {
                failures.push(response.message);
            }
        }
        if failures.is_empty() {
            AgentResponse::done(format!("released {} stale pods", stale.len()))
        } else {
            AgentResponse::failed(failures.join("; "))
        }
    }

    /// Releases enrolled pods whose network namespace is gone, and adopts
    /// or releases the pods of state files that no enrolled pod has: those
    /// a previous agent enrolled, or whose adoption failed before.
    pub(super) async fn sweep_pods(&mut self) {
        let Some(state) = self.pods.state.clone() else {
            return;
        };

        let vanished: Vec<usize> = (0..self.pods.enrolled.len())
            .rev()
            .filter(|index| !self.pods.enrolled[*index].record.netns.exists())
            .collect();
        for index in vanished {
            let pod = self.pods.enrolled.swap_remove(index);
            tracing::info!(workload = %pod.record.workload, netns = %pod.record.netns.display(), "network namespace of an enrolled pod is gone, releasing it");
            if let Err(error) = self.release_pod(pod) {
                tracing::error!(
                    error = format!("{error:#}"),
                    "failed to release a pod whose namespace is gone"
                );
            }
        }

        let records = match state.list() {
            Ok(records) => records,
            Err(error) => {
                tracing::error!(
                    error = crate::error_chain(&error),
                    "failed to read the pod state directory"
                );
                return;
            }
        };
        for record in records {
            match record {
                Ok(record) if self.pod_by_container(&record.container_id).is_none() => {
                    self.adopt(&state, record).await;
                }
                Ok(_) => {}
                Err(error) => {
                    tracing::warn!(error = crate::error_chain(&error), "pod state file skipped");
                }
            }
        }
    }

    /// Enrols the pod of a state file again, or releases it when its
    /// namespace or its selector is gone. A failed enrolment keeps the
    /// file and the pins, so the pod's ports stay closed, and the next
    /// sweep tries again.
    async fn adopt(&mut self, state: &StateDir, record: PodRecord) {
        let selector = self.selector_named(&record.selector);
        let reason = if record.version != STATE_VERSION {
            Some("state file of another version")
        } else if !record.netns.exists() {
            Some("network namespace gone")
        } else if selector.is_none() {
            Some("selector no longer configured")
        } else {
            None
        };
        if let Some(reason) = reason {
            tracing::info!(workload = %record.workload, container_id = %record.container_id, reason, "releasing a pod from the state directory");
            if let Err(error) = self.forget_record(state, &record) {
                tracing::error!(workload = %record.workload, error = format!("{error:#}"), "failed to release a pod from the state directory");
            }
            return;
        }
        let Some(selector) = selector else { return };

        match self.protect_pod(&record, &selector).await {
            Ok(protected) => {
                tracing::info!(workload = %record.workload, container_id = %record.container_id, "pod adopted");
                self.pods.enrolled.push(EnrolledPod { record, protected });
            }
            Err(error) => {
                tracing::error!(workload = %record.workload, error = format!("{error:#}"), "failed to adopt a pod, its protected ports stay closed");
            }
        }
    }

    /// Applies a reloaded configuration to the enrolled pods: each gets its
    /// selector's new settings, and pods whose selector is gone, or all of
    /// them when enrolment was removed, are released.
    pub(super) fn apply_pods(&mut self) {
        if let Some(namespaces) = &self.pods.namespaces {
            let selectors = self
                .running
                .config
                .enrollment
                .as_ref()
                .map_or(&[][..], |enrollment| enrollment.selectors.as_slice());
            namespaces.send_replace(namespace_filter(selectors));
        }
        for mut pod in std::mem::take(&mut self.pods.enrolled) {
            let Some(selector) = self.selector_named(&pod.record.selector) else {
                tracing::info!(workload = %pod.record.workload, selector = %pod.record.selector, "selector of an enrolled pod removed, releasing the pod");
                if let Err(error) = self.release_pod(pod) {
                    tracing::error!(error = format!("{error:#}"), "failed to release a pod");
                }
                continue;
            };

            let mut workload = selector.workload(
                pod.record.workload.clone(),
                pod.record.netns.clone(),
                probe_rules(&pod.record.probes),
            );
            if pod.protected.config.ports != workload.ports {
                if let Err(error) =
                    self.enroll
                        .set_ports(&self.core, &mut pod.protected.enrolled, &workload)
                {
                    tracing::error!(workload = %workload.name, error = format!("{error:#}"), "failed to change the protected ports of a pod, the previous ports stay steered");
                    workload.ports.clone_from(&pod.protected.config.ports);
                }
            }
            pod.protected
                .slot
                .store(self.core.workload_proxy(&workload));
            pod.protected.config = workload;
            self.pods.enrolled.push(pod);
        }
    }

    /// Detaches `pod`, drains its connections in the background and
    /// removes its state file.
    fn release_pod(&mut self, pod: EnrolledPod<E::Enrolled>) -> anyhow::Result<()> {
        let EnrolledPod { record, protected } = pod;
        self.unprotect(protected);
        if let Some(state) = &self.pods.state {
            state.remove(&record.container_id)?;
        }
        Ok(())
    }

    /// Removes the pins and the state file of a pod that is not enrolled.
    fn forget_record(&self, state: &StateDir, record: &PodRecord) -> anyhow::Result<()> {
        self.enroll.forget(&record.workload)?;
        state.remove(&record.container_id)?;
        Ok(())
    }

    fn pod_by_container(&self, container_id: &str) -> Option<&EnrolledPod<E::Enrolled>> {
        self.pods
            .enrolled
            .iter()
            .find(|enrolled| enrolled.record.container_id == container_id)
    }

    fn selector_for(&self, pod: &Pod) -> Option<SelectorConfig> {
        let enrollment = self.running.config.enrollment.as_ref()?;
        enrollment::select(&enrollment.selectors, pod).cloned()
    }

    fn selector_named(&self, name: &str) -> Option<SelectorConfig> {
        let enrollment = self.running.config.enrollment.as_ref()?;
        enrollment
            .selectors
            .iter()
            .find(|selector| selector.name == name)
            .cloned()
    }
}

fn enrolled_response(record: &PodRecord) -> AgentResponse {
    AgentResponse {
        outcome: Outcome::Enrolled,
        workload: Some(record.workload.clone()),
        selector: Some(record.selector.clone()),
        message: String::new(),
    }
}

fn not_selected() -> AgentResponse {
    AgentResponse {
        outcome: Outcome::NotSelected,
        workload: None,
        selector: None,
        message: String::new(),
    }
}
