//! The configuration example in the README is the one users copy, so it
//! must pass the agent's own parser and validation.

use std::path::Path;

/// Returns the first fenced YAML block after the `## Configuration` heading.
fn readme_config_example() -> String {
    let readme_path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md");
    let readme = std::fs::read_to_string(&readme_path).expect("README.md is readable");

    let section = readme
        .find("## Configuration")
        .expect("README has a Configuration section");
    let fence = "```yaml\n";
    let start = readme[section..]
        .find(fence)
        .expect("a yaml block in the section")
        + section;
    let body_start = start + fence.len();
    let length = readme[body_start..]
        .find("```")
        .expect("the yaml block is closed");
    readme[body_start..body_start + length].to_owned()
}

#[test]
fn readme_example_is_valid() {
    let example = readme_config_example();

    let config = tokengate::config::parse(&example, "README.md")
        .unwrap_or_else(|error| panic!("the README configuration example is rejected: {error}"));

    assert_eq!(config.workloads.len(), 1);
    assert!(
        config.workloads[0].rules.len() >= 5,
        "every rule form is shown"
    );
}
