//! Reads what `cargo test` printed and the harness's skip file, and tallies
//! which test binaries ran, what passed, failed and skipped.

use std::fmt::Write as _;

/// One test binary that cargo ran: a crate's unit tests, an integration
/// test file or a crate's doc-tests.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct BinaryRun {
    /// What cargo printed after `Running` or `Doc-tests`, shortened.
    pub name: String,
    /// Counts from its `test result:` line, or `None` when the binary ended
    /// without one because it crashed or was killed.
    pub result: Option<Counts>,
    /// Tests that libtest reported as `FAILED`.
    pub failed_tests: Vec<String>,
}

/// Counts from one libtest `test result:` line.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    pub passed: u64,
    pub failed: u64,
    pub ignored: u64,
    /// Tests left out by a name filter.
    pub filtered_out: u64,
}

/// A test that the harness recorded as skipped, with the reason.
#[derive(Debug, PartialEq, Eq)]
pub struct Skip {
    pub test: String,
    pub reason: String,
}

/// Collects the test binaries from `cargo test` output, fed one line at a
/// time in the order cargo and the binaries printed them.
#[derive(Debug, Default)]
pub struct OutputParser {
    runs: Vec<BinaryRun>,
}

impl OutputParser {
    /// Reads one line of output.
    pub fn feed(&mut self, line: &str) {
        let line = line.trim_end();
        let trimmed = line.trim_start();

        if let Some(rest) = trimmed.strip_prefix("Running ") {
            self.start(shorten_binary(rest));
        } else if let Some(rest) = trimmed.strip_prefix("Doc-tests ") {
            self.start(format!("doc-tests {rest}"));
        } else if let Some(rest) = line.strip_prefix("test result: ") {
            let counts = parse_counts(rest);
            self.current().result = Some(counts);
        } else if let Some(name) = parse_failed_test(line) {
            self.current().failed_tests.push(name.to_owned());
        }
    }

    /// Returns the test binaries in the order they ran.
    pub fn finish(self) -> Vec<BinaryRun> {
        self.runs
    }

    fn start(&mut self, name: String) {
        self.runs.push(BinaryRun {
            name,
            ..BinaryRun::default()
        });
    }

    /// Returns the binary that is running, or a placeholder for output that
    /// came before any `Running` line.
    fn current(&mut self) -> &mut BinaryRun {
        if self.runs.is_empty() {
            self.start("unnamed test binary".to_owned());
        }
        self.runs.last_mut().expect("a run was just pushed")
    }
}

/// Totals over every binary and the skip file, as the closing line prints
/// them.
#[derive(Debug, PartialEq, Eq)]
pub struct Totals {
    /// Tests that passed, without those that skipped at run time: libtest
    /// counts a test that returns early as passed.
    pub passed: u64,
    /// Failed tests, plus one for each binary that ended without a result.
    pub failed: u64,
    /// Tests skipped at run time plus tests marked `#[ignore]`.
    pub skipped: u64,
    pub ignored: u64,
}

/// Adds up the counts of every binary and the skips.
pub fn totals(runs: &[BinaryRun], skips: &[Skip]) -> Totals {
    let mut passed = 0;
    let mut failed = 0;
    let mut ignored = 0;
    for run in runs {
        match run.result {
            Some(counts) => {
                passed += counts.passed;
                failed += counts.failed;
                ignored += counts.ignored;
            }
            None => failed += 1,
        }
    }

    let skipped = skips.len() as u64;
    Totals {
        passed: passed.saturating_sub(skipped),
        failed,
        skipped: skipped + ignored,
        ignored,
    }
}

/// Parses the skip file: one `SKIP: TEST: REASON` line per skipped test. A
/// line in another form is kept whole as the reason, so nothing the harness
/// wrote is lost.
pub fn parse_skips(contents: &str) -> Vec<Skip> {
    contents
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty())
        .map(|line| {
            let entry = line.strip_prefix("SKIP:").map(str::trim_start);
            match entry.and_then(|entry| entry.split_once(": ")) {
                Some((test, reason)) => Skip {
                    test: test.trim().to_owned(),
                    reason: reason.trim().to_owned(),
                },
                None => Skip {
                    test: String::new(),
                    reason: line.to_owned(),
                },
            }
        })
        .collect()
}

/// Renders the report that follows cargo's own output. Its last line is
/// `N passed, N failed, N skipped` alone.
pub fn render(runs: &[BinaryRun], skips: &[Skip], totals: &Totals) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "test: {} test binaries ran", runs.len());
    for run in runs {
        match run.result {
            Some(counts) => {
                let verdict = if counts.failed == 0 { "ok" } else { "FAILED" };
                let filtered = if counts.filtered_out > 0 {
                    format!(", {} filtered out", counts.filtered_out)
                } else {
                    String::new()
                };
                let _ = writeln!(
                    out,
                    "  {verdict:<6} {}: {} passed, {} failed, {} ignored{filtered}",
                    run.name, counts.passed, counts.failed, counts.ignored
                );
            }
            None => {
                let _ = writeln!(
                    out,
                    "  FAILED {}: ended without a `test result:` line (crashed or killed)",
                    run.name
                );
            }
        }
        for test in &run.failed_tests {
            let _ = writeln!(out, "         failed: {test}");
        }
    }

    if skips.is_empty() {
        let _ = writeln!(out, "test: no test skipped at run time");
    } else {
        let _ = writeln!(out, "test: {} tests skipped at run time", skips.len());
        for skip in skips {
            if skip.test.is_empty() {
                let _ = writeln!(out, "  {}", skip.reason);
            } else {
                let _ = writeln!(out, "  {}: {}", skip.test, skip.reason);
            }
        }
    }
    if totals.ignored > 0 {
        let _ = writeln!(
            out,
            "test: {} tests marked #[ignore] did not run",
            totals.ignored
        );
    }

    let _ = writeln!(
        out,
        "{} passed, {} failed, {} skipped",
        totals.passed, totals.failed, totals.skipped
    );
    out
}

/// Shortens `unittests src/lib.rs (target/release/deps/tokengate-1a2b)` to
/// `unittests src/lib.rs (tokengate)`, because the folder and cargo's hash
/// mean nothing to a reader.
fn shorten_binary(text: &str) -> String {
    let Some((description, path)) = text
        .strip_suffix(')')
        .and_then(|inner| inner.rsplit_once(" ("))
    else {
        return text.to_owned();
    };

    let file = path.rsplit('/').next().unwrap_or(path);
    let stem = match file.rsplit_once('-') {
        Some((stem, hash)) if hash.chars().all(|c| c.is_ascii_hexdigit()) => stem,
        _ => file,
    };
    format!("{description} ({stem})")
}

/// Parses the numbers of `ok. 3 passed; 1 failed; 0 ignored; 0 measured;
/// 0 filtered out; finished in 0.01s`.
fn parse_counts(text: &str) -> Counts {
    let mut counts = Counts::default();
    let fields = text.split_once(". ").map_or(text, |(_, fields)| fields);
    for field in fields.split(';') {
        let Some((number, label)) = field.trim().split_once(' ') else {
            continue;
        };
        let Ok(number) = number.parse::<u64>() else {
            continue;
        };
        match label {
            "passed" => counts.passed = number,
            "failed" => counts.failed = number,
            "ignored" => counts.ignored = number,
            "filtered out" => counts.filtered_out = number,
            _ => {}
        }
    }
    counts
}

/// Returns the test name of a `test NAME ... FAILED` line.
fn parse_failed_test(line: &str) -> Option<&str> {
    let rest = line.strip_prefix("test ")?;
    let name = rest.strip_suffix(" ... FAILED")?;
    Some(name.trim())
}

#[cfg(test)]
mod tests {
    use super::*;

    const OUTPUT: &str = "\
   Compiling tokengate v0.1.0 (/w/agent)
    Finished `release` profile [optimized + debuginfo] target(s) in 1.00s
     Running unittests src/lib.rs (target/release/deps/tokengate-0f1e2d3c4b5a6978)

running 3 tests
test verify::tests::expired ... ok
test policy::tests::deny ... FAILED
test policy::tests::slow ... ignored

failures:

---- policy::tests::deny stdout ----
thread 'policy::tests::deny' panicked

failures:
    policy::tests::deny

test result: FAILED. 1 passed; 1 failed; 1 ignored; 0 measured; 0 filtered out; finished in 0.01s

     Running tests/e2e.rs (target/release/deps/e2e-aa11bb22cc33dd44)

running 4 tests
test e2e_demo_cases ... ok
test result: ok. 4 passed; 0 failed; 0 ignored; 0 measured; 2 filtered out; finished in 2.50s

     Running tests/crash.rs (target/release/deps/crash-0123456789abcdef)

running 1 test
error: test failed, to rerun pass `-p tokengate-tests --test crash`
   Doc-tests tokengate

running 0 tests

test result: ok. 0 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 0.00s
";

    fn parse(output: &str) -> Vec<BinaryRun> {
        let mut parser = OutputParser::default();
        for line in output.lines() {
            parser.feed(line);
        }
        parser.finish()
    }

    #[test]
    fn binaries_named_in_order() {
        let runs = parse(OUTPUT);

        let names: Vec<&str> = runs.iter().map(|run| run.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "unittests src/lib.rs (tokengate)",
                "tests/e2e.rs (e2e)",
                "tests/crash.rs (crash)",
                "doc-tests tokengate",
            ]
        );
    }

    #[test]
    fn result_line_counts_parsed() {
        let runs = parse(OUTPUT);

        let counts = runs[0].result.expect("a result line");
        assert_eq!(counts.passed, 1);
        assert_eq!(counts.failed, 1);
        assert_eq!(counts.ignored, 1);
        assert_eq!(runs[1].result.map(|counts| counts.filtered_out), Some(2));
    }

    #[test]
    fn failed_test_named() {
        let runs = parse(OUTPUT);

        assert_eq!(runs[0].failed_tests, ["policy::tests::deny"]);
        assert!(runs[1].failed_tests.is_empty());
    }

    #[test]
    fn crashed_binary_has_no_result() {
        let runs = parse(OUTPUT);

        assert_eq!(runs[2].result, None);
    }

    #[test]
    fn totals_move_skips_out_of_passed() {
        let runs = parse(OUTPUT);
        let skips = parse_skips("SKIP: e2e_demo_cases: needs root\n");

        let totals = totals(&runs, &skips);

        assert_eq!(totals.passed, 4);
        assert_eq!(totals.failed, 2, "one failed test and one crashed binary");
        assert_eq!(totals.skipped, 2, "one run-time skip and one #[ignore]");
        assert_eq!(totals.ignored, 1);
    }

    #[test]
    fn skips_parsed_in_both_forms() {
        let skips = parse_skips("SKIP: fail_closed: needs root: run as root\n\nfree text line\n");

        assert_eq!(
            skips,
            [
                Skip {
                    test: "fail_closed".to_owned(),
                    reason: "needs root: run as root".to_owned(),
                },
                Skip {
                    test: String::new(),
                    reason: "free text line".to_owned(),
                },
            ]
        );
    }

    #[test]
    fn render_ends_with_plain_totals_line() {
        let runs = parse(OUTPUT);
        let skips = parse_skips("SKIP: e2e_demo_cases: needs root\n");
        let totals = totals(&runs, &skips);

        let report = render(&runs, &skips, &totals);

        assert_eq!(report.lines().last(), Some("4 passed, 2 failed, 2 skipped"));
        assert!(report.contains("  e2e_demo_cases: needs root\n"));
        assert!(report.contains("failed: policy::tests::deny"));
        assert!(report.contains("tests/crash.rs (crash): ended without"));
        assert!(report.contains("(e2e): 4 passed, 0 failed, 0 ignored, 2 filtered out\n"));
    }

    #[test]
    fn unparsable_running_line_kept_whole() {
        assert_eq!(shorten_binary("something odd"), "something odd");
    }
}
