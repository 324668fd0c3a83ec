//! Processes started inside a pod: in its network namespace and in its
//! cgroup, so that cgroup-attached eBPF programs see them.

use std::ffi::OsStr;
use std::io::Read;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// Interval between two polls of a child's state.
const POLL_INTERVAL: Duration = Duration::from_millis(20);

/// Shell script that moves its own process into the cgroup whose
/// `cgroup.procs` file is `$0`, then replaces itself with the command in
/// `"$@"`. The move happens before the command starts, so every socket it
/// creates belongs to the cgroup.
const ENTER_CGROUP_SCRIPT: &str = r#"echo $$ > "$0" && exec "$@""#;

/// Builds a command that runs `program` in the namespace at `netns_path`
/// (the current one when `None`) and in the cgroup at `cgroup` (the current
/// one when `None`). Arguments added to the returned command go to
/// `program`.
///
/// `nsenter` enters only the network namespace, so the host's `/sys`
/// (bpffs, cgroups) stays visible to the command, unlike under
/// `ip netns exec`.
pub(crate) fn command_in(
    netns_path: Option<&Path>,
    cgroup: Option<&Path>,
    program: impl AsRef<OsStr>,
) -> Command {
    let mut inner: Vec<&OsStr> = Vec::new();
    let net_arg;
    if let Some(path) = netns_path {
        net_arg = format!("--net={}", path.display());
        inner.extend([
            OsStr::new("nsenter"),
            OsStr::new(&net_arg),
            OsStr::new("--"),
        ]);
    }
    inner.push(program.as_ref());

    let Some(cgroup) = cgroup else {
        let mut command = Command::new(inner[0]);
        command.args(&inner[1..]);
        return command;
    };
    let procs = cgroup.join("cgroup.procs");
    let mut command = Command::new("sh");
    command
        .arg("-c")
        .arg(ENTER_CGROUP_SCRIPT)
        .arg(procs)
        .args(inner);
    command
}

/// A process started in a pod. Drop kills it and reaps it.
#[derive(Debug)]
pub struct PodProcess {
    child: Child,
    label: String,
    exit_status: Option<ExitStatus>,
}

impl PodProcess {
    /// Spawns `command`; `label` names it in error messages.
    pub fn spawn(mut command: Command, label: &str) -> Result<Self> {
        let child = command
            .spawn()
            .with_context(|| format!("failed to start {label}"))?;
        Ok(Self {
            child,
            label: label.to_owned(),
            exit_status: None,
        })
    }

    /// Process id; with the cgroup wrapper this is the program's own pid,
    /// because the shell replaces itself with it.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Returns the child, for its piped standard streams.
    pub fn child_mut(&mut self) -> &mut Child {
        &mut self.child
    }

    /// Waits until the process exits, or kills it after `timeout`.
    pub fn wait(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_wait()? {
                return Ok(status);
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                bail!("{} still running after {timeout:?}; killed it", self.label);
            }
            std::thread::sleep(POLL_INTERVAL);
        }
    }

    /// Returns the exit status if the process has exited.
    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>> {
        if self.exit_status.is_none() {
            self.exit_status = self
                .child
                .try_wait()
                .with_context(|| format!("failed to poll {}", self.label))?;
        }
        Ok(self.exit_status)
    }
}

impl Drop for PodProcess {
    fn drop(&mut self) {
        if self.exit_status.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Output of a command that ran to its end.
#[derive(Clone, Debug)]
pub struct CommandOutput {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

/// Runs `command` to its end with piped output, killing it after
/// `timeout`.
pub(crate) fn run_bounded(
    mut command: Command,
    label: &str,
    timeout: Duration,
) -> Result<CommandOutput> {
    command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut process = PodProcess::spawn(command, label)?;
    let stdout = process.child.stdout.take().context("stdout is not piped")?;
    let stderr = process.child.stderr.take().context("stderr is not piped")?;
    let stdout_reader = std::thread::spawn(move || read_all(stdout));
    let stderr_reader = std::thread::spawn(move || read_all(stderr));

    let status = process.wait(timeout)?;
    Ok(CommandOutput {
        status,
        stdout: stdout_reader.join().unwrap_or_default(),
        stderr: stderr_reader.join().unwrap_or_default(),
    })
}

fn read_all(mut reader: impl Read) -> String {
    let mut bytes = Vec::new();
    let _ = reader.read_to_end(&mut bytes);
    String::from_utf8_lossy(&bytes).into_owned()
}
