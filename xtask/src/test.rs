//! `cargo xtask test`: every test of the workspace, root and eBPF ones
//! included, and a summary of what ran, failed and skipped.

mod summary;

use std::ffi::OsString;
use std::fs;
use std::io::{self, BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, ExitCode};

use anyhow::Context;

use crate::build::{self, Profile, EBPF_OBJECT_ENV};
use crate::demo::AGENT_BIN_ENV;
use crate::{process, setup, workspace};

/// Runs setup and the release build, then `cargo test` over the workspace,
/// and prints the summary. Fails on any failed test, on a `cargo test`
/// failure, and with `CI=true` on any test skipped at run time.
pub fn run(root: &Path, test_args: &[OsString]) -> anyhow::Result<ExitCode> {
    setup::run()?;
    let artifacts = build::run(root, Profile::Release)?;
    if !workspace::is_root() {
        println!("test: not root, so tests that need root will skip");
    }

    let skips_file = workspace::test_skips_file(root);
    reset_skips_file(&skips_file)?;

    // Release, so that the tests reuse the agent build from above. No fail
    // fast, so that one failing binary does not hide the others' results.
    let mut command = Command::new(workspace::cargo());
    command
        .current_dir(root)
        .env(AGENT_BIN_ENV, &artifacts.agent)
        .env(EBPF_OBJECT_ENV, &artifacts.ebpf_object)
        .args(["test", "--workspace", "--release", "--no-fail-fast"]);
    if !test_args.is_empty() {
        command.arg("--").args(test_args);
    }
    let (runs, status) = run_and_parse(command)?;

    let skips_text = match fs::read_to_string(&skips_file) {
        Ok(text) => text,
        Err(error) if error.kind() == io::ErrorKind::NotFound => String::new(),
        Err(error) => {
            return Err(error).with_context(|| format!("failed to read {}", skips_file.display()))
        }
    };
    let skips = summary::parse_skips(&skips_text);
    let totals = summary::totals(&runs, &skips);

    println!();
    let mut success = status.success() && totals.failed == 0;
    if !status.success() && totals.failed == 0 {
        println!(
            "test: `cargo test` failed ({status}) without a failed test: see its output above"
        );
    }
    if workspace::in_ci() && !skips.is_empty() {
        println!(
            "test: CI=true, and {} tests skipped at run time: in CI every test must run",
            skips.len()
        );
        success = false;
    }
    print!("{}", summary::render(&runs, &skips, &totals));
    io::stdout()
        .flush()
        .context("failed to write the summary")?;

    Ok(if success {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Empties the skip file, so that it holds only this run's skips.
fn reset_skips_file(path: &Path) -> anyhow::Result<()> {
    if let Some(folder) = path.parent() {
        fs::create_dir_all(folder)
            .with_context(|| format!("failed to create {}", folder.display()))?;
    }
    fs::write(path, "").with_context(|| format!("failed to empty {}", path.display()))
}

/// Runs `command` with standard output and standard error on one pipe,
/// echoes every line, and parses the test results from them.
///
/// One pipe keeps cargo's `Running` lines (standard error) in order with
/// the `test result:` lines that each test binary prints on standard output.
fn run_and_parse(
    mut command: Command,
) -> anyhow::Result<(Vec<summary::BinaryRun>, std::process::ExitStatus)> {
    let line = process::describe(&command);
    println!("+ {line}");

    let (reader, writer) = io::pipe().context("failed to create a pipe")?;
    let writer_for_stderr = writer.try_clone().context("failed to duplicate the pipe")?;
    command.stdout(writer).stderr(writer_for_stderr);
    let mut child = command
        .spawn()
        .with_context(|| format!("failed to start `{line}`"))?;
    // The command keeps its copies of the pipe's write end: drop it so that
    // the read below ends when the child exits.
    drop(command);

    let mut parser = summary::OutputParser::default();
    let mut reader = BufReader::new(reader);
    let mut buffer = Vec::new();
    let stdout = io::stdout();
    loop {
        buffer.clear();
        let read = reader
            .read_until(b'\n', &mut buffer)
            .with_context(|| format!("failed to read the output of `{line}`"))?;
        if read == 0 {
            break;
        }
        let text = String::from_utf8_lossy(&buffer);
        let mut out = stdout.lock();
        // A closed standard output must not stop the tests or the summary.
        let _ = out.write_all(text.as_bytes());
        let _ = out.flush();
        parser.feed(&text);
    }

    let status = child
        .wait()
        .with_context(|| format!("failed to wait for `{line}`"))?;
    Ok((parser.finish(), status))
}
