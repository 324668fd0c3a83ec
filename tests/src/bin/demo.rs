//! `tokengate-demo`: the main job of tokengate on one node, shown end to end.
//!
//! Creates the pod namespaces `orders` and `client`, with `tg-echo` in
//! `orders` on a protected and an unprotected port. Starts a token issuer on
//! loopback and the agent protecting `orders`, then calls `orders` from the
//! host and from `client` with missing, expired, unknown-key,
//! under-privileged and valid tokens. Then it stops the agent and shows that
//! the protected port fails closed while the unprotected one still responds.
//! It prints every result, the audit lines and the agent's metrics, removes
//! what it made, and exits 0 only if every check matched. Run it as root.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Parser;
use tokengate_tests::agent::agent_binary;
use tokengate_tests::cases::{self, Attempt};
use tokengate_tests::metrics;
use tokengate_tests::netns::netns_exists;
use tokengate_tests::skip::check_environment;
use tokengate_tests::testbed::{
    probe, Reachability, Testbed, TestbedOptions, PROTECTED_PORT, UNPROTECTED_PORT,
};
use tokio::signal::unix::{signal, SignalKind};

/// Namespace names the demo uses, as a reader of the demo expects them.
const ORDERS_NETNS: &str = "orders";
const CLIENT_NETNS: &str = "client";

/// Time allowed for the audit lines of all requests to appear.
const AUDIT_TIMEOUT: Duration = Duration::from_secs(5);

/// Time allowed for the agent to drain and exit after SIGTERM: the test
/// agent's 5 s drain plus shutdown.
const STOP_TIMEOUT: Duration = Duration::from_secs(15);

/// Show tokengate steering, verifying, auditing and failing closed.
#[derive(Parser, Debug)]
struct Args {
    /// Path of the tokengate agent binary; default: the `TOKENGATE_BIN`
    /// environment variable, else target/release/tokengate.
    agent: Option<PathBuf>,
    /// Leave the namespaces, bridge, service, pins and logs in place after
    /// the run, and print the commands that remove them.
    #[arg(long)]
    keep: bool,
}

/// Outcome of one check that is not a request case.
struct Check {
    label: String,
    expected: String,
    actual: String,
    passed: bool,
}

impl Check {
    fn print(&self) {
        println!(
            "[{}] {:<48} expected {:<16} actual {}",
            if self.passed { "PASS" } else { "FAIL" },
            self.label,
            self.expected,
            self.actual
        );
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    let interrupted = match watch_interrupts() {
        Ok(flag) => flag,
        Err(error) => {
            eprintln!("tokengate-demo: {error:#}");
            return ExitCode::FAILURE;
        }
    };
    match run(&args, &interrupted) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(error) => {
            eprintln!("tokengate-demo: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// Turns SIGINT and SIGTERM into a flag, so an interrupted demo still runs
/// its cleanup. The handlers live on a thread with its own tokio runtime.
/// Child processes get the default actions back when they exec, because
/// exec resets caught signals. Blocking the signals instead does not work,
/// because children inherit the mask and the agent would ignore SIGTERM.
fn watch_interrupts() -> Result<Arc<AtomicBool>> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("failed to build the signal runtime")?;
    let (mut interrupt, mut terminate) = runtime
        .block_on(async {
            Ok::<_, std::io::Error>((
                signal(SignalKind::interrupt())?,
                signal(SignalKind::terminate())?,
            ))
        })
        .context("failed to install the SIGINT and SIGTERM handlers")?;

    let flag = Arc::new(AtomicBool::new(false));
    let thread_flag = Arc::clone(&flag);
    std::thread::spawn(move || {
        let name = runtime.block_on(async {
            tokio::select! {
                _ = interrupt.recv() => "SIGINT",
                _ = terminate.recv() => "SIGTERM",
            }
        });
        eprintln!("tokengate-demo: {name} received, stopping and cleaning up");
        thread_flag.store(true, Ordering::SeqCst);
    });
    Ok(flag)
}

fn check_interrupted(interrupted: &AtomicBool) -> Result<()> {
    if interrupted.load(Ordering::SeqCst) {
        bail!("interrupted");
    }
    Ok(())
}

fn run(args: &Args, interrupted: &AtomicBool) -> Result<bool> {
    let agent = args.agent.clone().unwrap_or_else(agent_binary);
    check_environment(&agent)
        .map_err(anyhow::Error::msg)
        .context("cannot run the demo")?;
    for name in [ORDERS_NETNS, CLIENT_NETNS] {
        if netns_exists(name) {
            bail!(
                "network namespace {name} already exists; the demo creates it and will not \
                 reuse or remove someone else's. Remove it with `ip netns del {name}` if it is \
                 left over from an earlier demo"
            );
        }
    }
    let echo_bin = std::env::current_exe()
        .context("failed to find the demo's own path")?
        .with_file_name("tg-echo");

    let options = TestbedOptions {
        echo_bin,
        agent_bin: agent,
        netns_names: Some((ORDERS_NETNS.to_owned(), CLIENT_NETNS.to_owned())),
    };
    let mut testbed = Testbed::new(&options)?;
    let passed = demonstrate(&mut testbed, interrupted);
    if args.keep {
        println!("\n--keep: left in place:\n{}", testbed.keep());
    }
    passed
}

fn demonstrate(testbed: &mut Testbed, interrupted: &AtomicBool) -> Result<bool> {
    println!("tokengate demo");
    println!(
        "  pod orders: netns {}, address {}, tg-echo on {PROTECTED_PORT} (protected) and {UNPROTECTED_PORT} (unprotected)",
        testbed.orders.netns, testbed.orders.address
    );
    println!(
        "  pod client: netns {}, address {}",
        testbed.client.netns, testbed.client.address
    );
    println!(
        "  bridge {} at {}",
        testbed.bridge_name(),
        testbed.orders.gateway
    );
    println!("  issuer: JWKS at {}", testbed.issuer.jwks_uri());

    check_interrupted(interrupted)?;
    let agent = testbed.start_agent()?;
    println!(
        "  agent: pid {}, admin http://{}, config {}",
        agent.pid(),
        agent.admin_addr(),
        agent.config_path().display()
    );

    check_interrupted(interrupted)?;
    let mut attempts = send_all_cases(testbed);
    check_interrupted(interrupted)?;
    let audit = testbed.agent().wait_for_audit(AUDIT_TIMEOUT, |lines| {
        attempts.iter().all(|attempt| {
            lines
                .iter()
                .any(|line| line["path"] == attempt.path.as_str())
        })
    })?;
    cases::check_audit(&mut attempts, &audit, testbed.protected_addr());
    cases::check_echo_log(&mut attempts, &testbed.echo.records()?);
    let decided = attempts.len() as u64;
    testbed.agent().wait_for_metrics(AUDIT_TIMEOUT, |samples| {
        metrics::count(samples, "tokengate_decisions_total", &[]) >= Some(decided)
    })?;
    let metrics_text = testbed.agent().metrics_text()?;

    println!(
        "\nRequests to {} (protected) from the host and from pod client:",
        testbed.protected_addr()
    );
    for attempt in &attempts {
        println!("{}", attempt.summary());
        if let Some(view) = &attempt.service_view {
            println!("       {view}");
        }
        for problem in &attempt.problems {
            println!("       problem: {problem}");
        }
    }

    let mut checks = Vec::new();
    let audit_text = testbed.agent().audit_text()?;
    let leaks = cases::find_token_leaks(&attempts, &audit_text);
    checks.push(Check {
        label: "audit lines contain no token".to_owned(),
        expected: "no token".to_owned(),
        actual: if leaks.is_empty() {
            "no token".to_owned()
        } else {
            leaks.join("; ")
        },
        passed: leaks.is_empty(),
    });

    println!("\nAudit lines ({}):", audit.len());
    for line in audit_text.lines() {
        println!("  {line}");
    }
    println!("\nMetrics (tokengate_*, histogram buckets left out):");
    for line in metrics_text
        .lines()
        .filter(|line| line.starts_with("tokengate_") && !line.contains("_bucket{"))
    {
        println!("  {line}");
    }

    check_interrupted(interrupted)?;
    checks.extend(stop_and_probe(testbed)?);
    println!("\nChecks after the requests:");
    for check in &checks {
        check.print();
    }

    let failed_attempts = attempts.iter().filter(|attempt| !attempt.passed()).count();
    let failed_checks = checks.iter().filter(|check| !check.passed).count();
    let total = attempts.len() + checks.len();
    let failed = failed_attempts + failed_checks;
    println!("\n{} passed, {failed} failed", total - failed);
    Ok(failed == 0)
}

fn send_all_cases(testbed: &Testbed) -> Vec<Attempt> {
    let mut attempts = Vec::new();
    for caller in testbed.outside_callers() {
        for case in cases::demo_cases() {
            attempts.push(cases::send_case(&case, &caller, testbed.protected_addr()));
        }
    }
    attempts
}

/// Stops the agent with SIGTERM and probes both ports from both callers.
fn stop_and_probe(testbed: &mut Testbed) -> Result<Vec<Check>> {
    let mut checks = Vec::new();
    let agent = testbed.agent_mut();
    agent.sigterm()?;
    let status = agent.wait_exit(STOP_TIMEOUT)?;
    checks.push(Check {
        label: "agent exits after SIGTERM".to_owned(),
        expected: "exit status 0".to_owned(),
        actual: status.to_string(),
        passed: status.success(),
    });

    for caller in testbed.outside_callers() {
        let protected = probe(&caller, testbed.protected_addr());
        checks.push(Check {
            label: format!(
                "{} -> protected port {PROTECTED_PORT}, agent stopped",
                caller.label()
            ),
            expected: "closed".to_owned(),
            actual: protected.to_string(),
            passed: protected.is_closed(),
        });
        let unprotected = probe(&caller, testbed.unprotected_addr());
        checks.push(Check {
            label: format!(
                "{} -> unprotected port {UNPROTECTED_PORT}, agent stopped",
                caller.label()
            ),
            expected: "answered 200".to_owned(),
            actual: unprotected.to_string(),
            passed: unprotected == Reachability::Answered(200),
        });
    }
    Ok(checks)
}
