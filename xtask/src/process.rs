//! Running external commands: each is printed before it runs, and a failure
//! names the command and its exit status.

use std::ffi::OsStr;
use std::process::{Command, ExitStatus};

use anyhow::{bail, Context};

/// Returns the command as a shell user would type it, environment
/// assignments first.
pub fn describe(command: &Command) -> String {
    let mut words = Vec::new();
    for (name, value) in command.get_envs() {
        if let Some(value) = value {
            words.push(format!("{}={}", name.to_string_lossy(), quote(value)));
        }
    }
    words.push(quote(command.get_program()));
    words.extend(command.get_args().map(quote));
    words.join(" ")
}

/// Prints the command, runs it with inherited standard streams and fails
/// unless it exits with status 0.
pub fn run(command: &mut Command) -> anyhow::Result<()> {
    let status = run_status(command)?;
    if !status.success() {
        bail!("`{}` failed: {status}", describe(command));
    }
    Ok(())
}

/// Prints the command, runs it with inherited standard streams and returns
/// its exit status, whatever it is.
pub fn run_status(command: &mut Command) -> anyhow::Result<ExitStatus> {
    let line = describe(command);
    println!("+ {line}");
    command
        .status()
        .with_context(|| format!("failed to start `{line}`"))
}

/// Runs a read-only probe without printing it. Returns its standard output
/// when it exits with status 0, or `None` when it cannot start or fails.
pub fn probe(command: &mut Command) -> Option<String> {
    let output = command.output().ok()?;
    if !output.status.success() {
        return None;
    }
    Some(String::from_utf8_lossy(&output.stdout).into_owned())
}

fn quote(word: &OsStr) -> String {
    let text = word.to_string_lossy();
    let plain = !text.is_empty()
        && text
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c));
    if plain {
        text.into_owned()
    } else {
        format!("'{}'", text.replace('\'', r"'\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn describe_puts_env_first() {
        let mut command = Command::new("cargo");
        command.args(["build", "-p", "tokengate"]).env("A", "1");

        assert_eq!(describe(&command), "A=1 cargo build -p tokengate");
    }

    #[test]
    fn describe_quotes_spaces_and_quotes() {
        let mut command = Command::new("echo");
        command.args(["two words", "it's", ""]);

        assert_eq!(describe(&command), r"echo 'two words' 'it'\''s' ''");
    }
}
