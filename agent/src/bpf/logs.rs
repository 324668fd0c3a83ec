//! Log records of the eBPF programs (aya-log), forwarded into the agent's
//! tracing at debug level and rate-limited per program.
//!
//! aya-log 0.2 reads the records on tokio tasks that it spawns and never
//! stops. Each program's reader tasks therefore run on a small runtime with
//! a thread of its own. Dropping [`ProgramLogs`] stops that runtime and its
//! tasks, so a program replaced by a re-attach no longer has readers.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use aya::Ebpf;
use tokio::sync::oneshot;
use tracing::{debug, warn};

/// Records a program may log at once after a quiet period. A connection
/// produces at most a few records, so 20 shows a short burst whole.
pub const LOG_BURST: f64 = 20.0;

/// Sustained records per second per program. At debug level each record
/// is a log line; 10 lines per second per pod keeps a flood of dropped
/// connections from drowning the agent's own log.
pub const LOG_RECORDS_PER_SECOND: f64 = 10.0;

/// Name of each reader thread; Linux shows at most 15 bytes of a thread
/// name.
pub const LOG_THREAD_NAME: &str = "tg-ebpf-log";

/// Target of the forwarded records, so that `RUST_LOG=tokengate::ebpf=debug`
/// selects them alone.
const LOG_TARGET: &str = "tokengate::ebpf";

/// The running log reader of one program.
pub struct ProgramLogs {
    stop: Option<oneshot::Sender<()>>,
    suppressed: Arc<AtomicU64>,
}

impl ProgramLogs {
    /// Starts reading the log records of the program in `ebpf`. Returns
    /// `None`, after a warning, when the object has no log map or the
    /// reader cannot start.
    pub fn start(ebpf: &mut Ebpf, workload: &str) -> Option<Self> {
        let runtime = match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(runtime) => runtime,
            Err(error) => {
                warn!(workload, %error, "failed to start the eBPF log reader");
                return None;
            }
        };
        let suppressed = Arc::new(AtomicU64::new(0));
        let logger = RateLimitedLog {
            workload: workload.to_owned(),
            bucket: Mutex::new(TokenBucket::new(
                LOG_BURST,
                LOG_RECORDS_PER_SECOND,
                Instant::now(),
            )),
            pending: AtomicU64::new(0),
            suppressed: Arc::clone(&suppressed),
        };

        // The reader tasks and their perf buffers belong to `runtime`.
        let started = {
            let _context = runtime.enter();
            aya_log::EbpfLogger::init_with_logger(ebpf, logger)
        };
        if let Err(error) = started {
            warn!(workload, %error, "eBPF logger failed to start");
            return None;
        }

        let (stop, stopped) = oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name(LOG_THREAD_NAME.to_owned())
            .spawn(move || {
                // Returns when `stop` is sent or dropped; dropping the
                // runtime then ends the reader tasks.
                let _ = runtime.block_on(stopped);
            });
        if let Err(error) = thread {
            warn!(workload, %error, "failed to start the eBPF log reader thread");
            return None;
        }
        Some(Self {
            stop: Some(stop),
            suppressed,
        })
    }

    /// Returns how many records were dropped by the rate limit so far.
    pub fn suppressed(&self) -> u64 {
        self.suppressed.load(Ordering::Relaxed)
    }
}

impl Drop for ProgramLogs {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            // The thread may have ended already; then nothing is left to stop.
            let _ = stop.send(());
        }
    }
}

/// A token bucket: `capacity` tokens, refilled at `per_second`.
#[derive(Debug)]
struct TokenBucket {
    capacity: f64,
    per_second: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    fn new(capacity: f64, per_second: f64, now: Instant) -> Self {
        Self {
            capacity,
            per_second,
            tokens: capacity,
            last: now,
        }
    }

    /// Takes one token if there is one.
    fn take(&mut self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.per_second).min(self.capacity);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Forwards aya-log records to tracing under the rate limit.
struct RateLimitedLog {
    workload: String,
    bucket: Mutex<TokenBucket>,
    /// Records suppressed since the last forwarded one.
    pending: AtomicU64,
    /// Records suppressed since the start.
    suppressed: Arc<AtomicU64>,
}

impl RateLimitedLog {
    /// Decides whether a record arriving at `now` is forwarded. Returns the
    /// number of records suppressed before it, or `None` when it is
    /// suppressed itself.
    fn admit(&self, now: Instant) -> Option<u64> {
        let admitted = self
            .bucket
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take(now);
        if admitted {
            Some(self.pending.swap(0, Ordering::Relaxed))
        } else {
            self.pending.fetch_add(1, Ordering::Relaxed);
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            None
        }
    }
}

impl log::Log for RateLimitedLog {
    fn enabled(&self, _metadata: &log::Metadata<'_>) -> bool {
        tracing::enabled!(target: LOG_TARGET, tracing::Level::DEBUG)
    }

    fn log(&self, record: &log::Record<'_>) {
        if !log::Log::enabled(self, record.metadata()) {
            return;
        }
        if let Some(suppressed_before) = self.admit(Instant::now()) {
            debug!(
                target: LOG_TARGET,
                workload = %self.workload,
                program.target = record.target(),
                program.level = %record.level(),
                record = %record.args(),
                suppressed_before,
                "eBPF program log"
            );
        }
    }

    fn flush(&self) {}
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn bucket_allows_burst_then_rate() {
        let start = Instant::now();
        let mut bucket = TokenBucket::new(3.0, 2.0, start);

        let burst: Vec<bool> = (0..4).map(|_| bucket.take(start)).collect();
        let after_half_second = bucket.take(start + Duration::from_millis(500));
        let right_after = bucket.take(start + Duration::from_millis(500));

        assert_eq!(burst, vec![true, true, true, false]);
        assert!(after_half_second);
        assert!(!right_after);
    }

    #[test]
    fn bucket_never_exceeds_capacity() {
        let start = Instant::now();
        let mut bucket = TokenBucket::new(2.0, 100.0, start);
        let later = start + Duration::from_secs(60);

        let granted = (0..5).filter(|_| bucket.take(later)).count();

        assert_eq!(granted, 2);
    }

    #[test]
    fn suppressed_records_are_counted_and_reported() {
        let start = Instant::now();
        let suppressed = Arc::new(AtomicU64::new(0));
        let logger = RateLimitedLog {
            workload: "orders".to_owned(),
            bucket: Mutex::new(TokenBucket::new(1.0, 1.0, start)),
            pending: AtomicU64::new(0),
            suppressed: Arc::clone(&suppressed),
        };

        let first = logger.admit(start);
        let dropped: Vec<Option<u64>> = (0..3).map(|_| logger.admit(start)).collect();
        let next = logger.admit(start + Duration::from_secs(1));

        assert_eq!(first, Some(0));
        assert_eq!(dropped, vec![None, None, None]);
        assert_eq!(next, Some(3));
        assert_eq!(suppressed.load(Ordering::Relaxed), 3);
    }
}
