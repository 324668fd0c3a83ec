//! Audit events: one JSON object per line for every decision.
//!
//! The request path hands events to a bounded queue and never waits on the
//! output. One writer task serialises them to standard output or appends
//! them to a file. When the queue is full the event is dropped, counted in
//! `tokengate_audit_events_dropped_total` and reported by a rate-limited
//! warning. An event never contains a token, only its fingerprint.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use prometheus::IntCounter;
use serde::{Serialize, Serializer};
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::config::AuditConfig;
use crate::decision::{Decision, Reason};

/// Capacity of the audit queue, in events. At a few hundred bytes each this
/// bounds the queue near 1 MiB, and it absorbs bursts of thousands of
/// requests while the output blocks for a moment.
pub const AUDIT_QUEUE_CAPACITY: usize = 4096;

/// Size of the writer's buffer, in bytes: room for about a hundred events,
/// so a burst under load reaches the output in a few writes.
const AUDIT_BUFFER_BYTES: usize = 64 * 1024;

/// Minimum time between two warnings about dropped events, so a stuck
/// output does not turn into a flood of log lines as well.
pub const DROP_WARNING_INTERVAL: Duration = Duration::from_secs(10);

/// Failure to open the audit output.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("failed to open audit file {path} for appending; check that its directory exists and is writable")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// One decision, as written to the audit output.
#[derive(Clone, Debug, Serialize)]
pub struct AuditEvent {
    /// When the decision was made, written in RFC 3339 UTC.
    #[serde(serialize_with = "serialize_rfc3339")]
    pub time: SystemTime,
    pub decision: Decision,
    pub reason: Reason,
    /// HTTP status sent to the caller; `None` when the connection was closed
    /// without a response.
    pub status: Option<u16>,
    pub workload: String,
    pub method: Option<String>,
    /// Request path without the query, which may carry secrets.
    pub path: Option<String>,
    /// Caller's address.
    pub source: SocketAddr,
    /// Original destination: the local address of the steered connection.
    pub destination: SocketAddr,
    /// `iss` of the token; unverified when the token was rejected.
    pub issuer: Option<String>,
    /// `sub` of a verified token.
    pub subject: Option<String>,
    /// First 16 hex characters of the token's SHA-256.
    pub token_fingerprint: Option<String>,
    pub verification_seconds: Option<f64>,
    /// Index of the rule that decided, `None` when no rule did.
    pub rule: Option<usize>,
}

impl AuditEvent {
    /// Starts an event for a decision made now about a connection from
    /// `source` to `destination`. The caller sets the other fields.
    pub fn new(
        workload: &str,
        reason: Reason,
        source: SocketAddr,
        destination: SocketAddr,
    ) -> Self {
        Self {
            time: SystemTime::now(),
            decision: reason.decision(),
            reason,
            status: None,
            workload: workload.to_owned(),
            method: None,
            path: None,
            source,
            destination,
            issuer: None,
            subject: None,
            token_fingerprint: None,
            verification_seconds: None,
            rule: None,
        }
    }
}

fn serialize_rfc3339<S: Serializer>(time: &SystemTime, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.collect_str(&humantime::format_rfc3339_micros(*time))
}

/// The request path's handle on the audit queue. Cloning shares the queue.
#[derive(Clone)]
pub struct AuditSink {
    queue: mpsc::Sender<AuditEvent>,
    dropped: IntCounter,
    last_warning: Arc<Mutex<Option<Instant>>>,
}

/// The task that writes queued events. It ends once every [`AuditSink`]
/// clone is dropped and the queue is written out.
pub struct AuditWriter {
    task: JoinHandle<()>,
}

impl AuditSink {
    /// Opens the configured output (the file in append mode, else standard
    /// output) and starts the writer task.
    pub async fn open(
        config: &AuditConfig,
        dropped: IntCounter,
    ) -> Result<(Self, AuditWriter), AuditError> {
        match &config.file {
            Some(path) => {
                let file = open_append(path).await?;
                Ok(Self::spawn(file, dropped))
            }
            None => Ok(Self::spawn(tokio::io::stdout(), dropped)),
        }
    }

    /// Starts a writer task that writes events to `output`.
    pub fn spawn<W>(output: W, dropped: IntCounter) -> (Self, AuditWriter)
    where
        W: AsyncWrite + Send + Unpin + 'static,
    {
        let (queue, receiver) = mpsc::channel(AUDIT_QUEUE_CAPACITY);
        let task = tokio::spawn(write_events(receiver, output));
        let sink = Self {
            queue,
            dropped,
            last_warning: Arc::new(Mutex::new(None)),
        };

        (sink, AuditWriter { task })
    }

    /// Queues `event` without waiting; drops and counts it when the queue is
    /// full or the writer is gone.
    pub fn record(&self, event: AuditEvent) {
        if self.queue.try_send(event).is_ok() {
            return;
        }

        self.dropped.inc();
        let now = Instant::now();
        let mut last = self
            .last_warning
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if last.is_none_or(|at| now.duration_since(at) >= DROP_WARNING_INTERVAL) {
            *last = Some(now);
            tracing::warn!(
                dropped_total = self.dropped.get(),
                "audit queue full, dropping audit events"
            );
        }
    }
}

impl AuditWriter {
    /// Waits until every queued event is written. Call it after dropping
    /// every [`AuditSink`] clone, or it waits for ever.
    pub async fn finish(self) {
        if let Err(error) = self.task.await {
            tracing::error!(%error, "audit writer task failed");
        }
    }
}

async fn open_append(path: &Path) -> Result<tokio::fs::File, AuditError> {
    tokio::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .await
        .map_err(|source| AuditError::Open {
            path: path.to_owned(),
            source,
        })
}

/// Writes each event as one line, flushing whenever the queue is empty so a
/// burst costs one flush and a quiet period leaves nothing buffered.
async fn write_events<W>(mut receiver: mpsc::Receiver<AuditEvent>, output: W)
where
    W: AsyncWrite + Send + Unpin,
{
    let mut output = tokio::io::BufWriter::with_capacity(AUDIT_BUFFER_BYTES, output);
    let mut line = Vec::with_capacity(512);
    let mut failing = false;

    while let Some(event) = receiver.recv().await {
        let mut next = Some(event);
        let mut result = Ok(());
        let mut yielded = false;
        while let Some(event) = next.take() {
            line.clear();
            serde_json::to_writer(&mut line, &event).expect("an audit event serialises to JSON");
            line.push(b'\n');
            result = result.and(output.write_all(&line).await);
            next = receiver.try_recv().ok();
            if next.is_none() && !yielded {
                // The first event of a burst wakes this task, which may run
                // before the other ready requests have queued theirs. After
                // one yield they have, and their events join this batch, so
                // fewer writes and flushes reach the output.
                yielded = true;
                tokio::task::yield_now().await;
                next = receiver.try_recv().ok();
            }
        }
        let result = result.and(output.flush().await);

        // Report the first failure of a run and the recovery, not every line.
        match result {
            Err(error) if !failing => {
                failing = true;
                tracing::error!(%error, "failed to write audit events");
            }
            Ok(()) if failing => {
                failing = false;
                tracing::info!("audit output writable again");
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr};

    use tokio::io::AsyncBufReadExt;

    use super::*;

    fn address(port: u16) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port)
    }

    #[tokio::test]
    async fn writes_one_json_line_per_event() {
        let (writer, reader) = tokio::io::duplex(64 * 1024);
        let (sink, task) = AuditSink::spawn(writer, IntCounter::new("dropped", "test").unwrap());
        let mut event = AuditEvent::new(
            "orders",
            Reason::MissingToken,
            address(40000),
            address(8080),
        );
        event.status = Some(401);
        event.method = Some("GET".to_owned());
        event.path = Some("/orders".to_owned());

        sink.record(event);
        drop(sink);
        task.finish().await;

        let mut lines = tokio::io::BufReader::new(reader).lines();
        let line = lines.next_line().await.unwrap().expect("one line");
        let json: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(json["decision"], "deny");
        assert_eq!(json["reason"], "missing_token");
        assert_eq!(json["status"], 401);
        assert_eq!(json["workload"], "orders");
        assert_eq!(json["source"], "127.0.0.1:40000");
        assert_eq!(json["destination"], "127.0.0.1:8080");
        assert_eq!(json["rule"], serde_json::Value::Null);
        assert!(json["time"].as_str().unwrap().ends_with('Z'), "{line}");
        assert!(lines.next_line().await.unwrap().is_none());
    }

    #[tokio::test]
    async fn full_queue_counts_dropped_events() {
        // The writer task cannot run before this test yields (the test
        // runtime has one thread), and the test never reads the pipe.
        let (writer, _reader) = tokio::io::duplex(1);
        let dropped = IntCounter::new("dropped", "test").unwrap();
        let (sink, _task) = AuditSink::spawn(writer, dropped.clone());
        let event = AuditEvent::new("orders", Reason::Allowed, address(40000), address(8080));

        for _ in 0..AUDIT_QUEUE_CAPACITY + 10 {
            sink.record(event.clone());
        }

        assert!(dropped.get() >= 10, "dropped {}", dropped.get());
    }

    #[tokio::test]
    async fn file_output_appends() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        std::fs::write(&path, "earlier line\n").unwrap();
        let config = AuditConfig {
            file: Some(path.clone()),
        };

        let (sink, task) = AuditSink::open(&config, IntCounter::new("dropped", "test").unwrap())
            .await
            .unwrap();
        sink.record(AuditEvent::new(
            "orders",
            Reason::Allowed,
            address(40000),
            address(8080),
        ));
        drop(sink);
        task.finish().await;

        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<_> = text.lines().collect();
        assert_eq!(lines.len(), 2, "{text}");
        assert_eq!(lines[0], "earlier line");
        assert!(lines[1].contains(r#""reason":"allowed""#), "{text}");
    }
}
