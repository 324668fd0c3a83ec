//! Line numbers of configuration fields, from the YAML event stream.
//!
//! `serde_yaml` reports a location for syntax and type errors only. The
//! validation pass runs on the deserialized structs, so this module parses
//! the same text once more with an event parser and records, for every
//! mapping key and sequence item, the line where it starts. It follows the
//! document structure, so a value that merely looks like a key elsewhere in
//! the file cannot be mistaken for the field.

use std::collections::{HashMap, HashSet};

use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser};
use yaml_rust2::scanner::Marker;

use super::path::FieldPath;

/// Line (1-based) of each field path in one YAML document, and the keys
/// that appear twice in one mapping.
#[derive(Debug, Default)]
pub(crate) struct LineIndex {
    lines: HashMap<FieldPath, usize>,
    duplicates: Vec<(FieldPath, usize)>,
}

impl LineIndex {
    /// Parses `text` and records the line of every node of its first
    /// document. Text that the event parser rejects yields an empty index,
    /// so errors are still reported, only without line numbers.
    pub(crate) fn build(text: &str) -> Self {
        let mut recorder = Recorder::default();
        let mut parser = Parser::new_from_str(text);
        if parser.load(&mut recorder, false).is_err() {
            return Self::default();
        }
        Self {
            lines: recorder.lines,
            duplicates: recorder.duplicates,
        }
    }

    /// Returns each repeated mapping key with the line of its repetition.
    /// serde rejects a repeated struct field, but a map such as `claims`
    /// would silently keep the last value.
    pub(crate) fn duplicate_keys(&self) -> &[(FieldPath, usize)] {
        &self.duplicates
    }

    /// Returns the line of `path`, or of its nearest ancestor present in the
    /// file, because a field left at its default has no line of its own.
    pub(crate) fn line_of(&self, path: &FieldPath) -> Option<usize> {
        let mut current = Some(path.clone());
        while let Some(candidate) = current {
            if let Some(line) = self.lines.get(&candidate) {
                return Some(*line);
            }
            current = candidate.parent();
        }
        None
    }
}

/// The next node a mapping expects: a key, or the value of a key.
#[derive(Debug)]
enum MappingState {
    /// A key.
    Key,
    /// The value of a scalar key.
    ValueOf(String),
    /// The value of a key that names no field, such as a sequence used as a
    /// key; the value gets no path.
    ValueOfUnnamed,
}

/// One open collection while walking the events. `path` is `None` inside
/// a part of the document that has no field path.
#[derive(Debug)]
enum Frame {
    Mapping {
        path: Option<FieldPath>,
        state: MappingState,
        seen_keys: HashSet<String>,
    },
    Sequence {
        path: Option<FieldPath>,
        next_index: usize,
    },
}

/// The role of the node that starts with the current event.
enum Node {
    /// A mapping key, recorded as the line of its value.
    Key,
    /// A value or sequence item, with its path when it has one.
    Value(Option<FieldPath>),
}

#[derive(Debug, Default)]
struct Recorder {
    stack: Vec<Frame>,
    lines: HashMap<FieldPath, usize>,
    duplicates: Vec<(FieldPath, usize)>,
    /// Set at the end of the first document: `serde_yaml` reads one document.
    finished: bool,
}

impl Recorder {
    /// Works out the role and path of the node that starts with `event`.
    fn classify(&mut self, event: &Event, line: usize) -> Node {
        let Some(top) = self.stack.last_mut() else {
            return Node::Value(Some(FieldPath::root()));
        };

        match top {
            Frame::Sequence { path, next_index } => {
                let item = path.as_ref().map(|parent| parent.index(*next_index));
                *next_index += 1;
                Node::Value(item)
            }
            Frame::Mapping {
                path,
                state,
                seen_keys,
            } => match std::mem::replace(state, MappingState::Key) {
                MappingState::Key => {
                    let Event::Scalar(key, ..) = event else {
                        // A collection or alias used as a key names no field;
                        // a collection key is walked without a path.
                        *state = MappingState::ValueOfUnnamed;
                        return if matches!(event, Event::Alias(..)) {
                            Node::Key
                        } else {
                            Node::Value(None)
                        };
                    };
                    if let Some(parent) = path.as_ref() {
                        if seen_keys.insert(key.clone()) {
                            self.lines.entry(parent.key(key)).or_insert(line);
                        } else {
                            self.duplicates.push((parent.key(key), line));
                        }
                    }
                    *state = MappingState::ValueOf(key.clone());
                    Node::Key
                }
                MappingState::ValueOf(key) => {
                    Node::Value(path.as_ref().map(|parent| parent.key(&key)))
                }
                MappingState::ValueOfUnnamed => Node::Value(None),
            },
        }
    }
}

impl MarkedEventReceiver for Recorder {
    fn on_event(&mut self, event: Event, mark: Marker) {
        if self.finished {
            return;
        }
        let line = mark.line();

        match event {
            Event::DocumentEnd => self.finished = true,
            Event::SequenceEnd | Event::MappingEnd => {
                self.stack.pop();
            }
            Event::Scalar(..)
            | Event::Alias(..)
            | Event::SequenceStart(..)
            | Event::MappingStart(..) => {
                let Node::Value(path) = self.classify(&event, line) else {
                    return;
                };
                if let Some(path) = &path {
                    self.lines.entry(path.clone()).or_insert(line);
                }
                match event {
                    Event::SequenceStart(..) => {
                        self.stack.push(Frame::Sequence {
                            path,
                            next_index: 0,
                        });
                    }
                    Event::MappingStart(..) => {
                        self.stack.push(Frame::Mapping {
                            path,
                            state: MappingState::Key,
                            seen_keys: HashSet::new(),
                        });
                    }
                    _ => {}
                }
            }
            Event::Nothing | Event::StreamStart | Event::StreamEnd | Event::DocumentStart => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "\
issuers:
  - issuer: https://a.example
    algorithms: [RS256, ES256]
workloads:
  - name: orders
    ports:
      - 8080
      - 0
    rules:
      - path_prefix: /orders
        claims:
          realm_access.roles: [admin]
        # ports: [1]
      - {path_prefix: /x, methods: [GET]}
";

    fn path(parts: &[&str]) -> FieldPath {
        let mut path = FieldPath::root();
        for part in parts {
            path = match part.parse::<usize>() {
                Ok(index) => path.index(index),
                Err(_) => path.key(part),
            };
        }
        path
    }

    #[test]
    fn lines_of_block_and_flow_nodes() {
        let index = LineIndex::build(TEXT);

        let cases: &[(&[&str], usize)] = &[
            (&["issuers"], 1),
            (&["issuers", "0"], 2),
            (&["issuers", "0", "issuer"], 2),
            (&["issuers", "0", "algorithms", "1"], 3),
            (&["workloads", "0", "ports"], 6),
            (&["workloads", "0", "ports", "1"], 8),
            (
                &[
                    "workloads",
                    "0",
                    "rules",
                    "0",
                    "claims",
                    "realm_access.roles",
                ],
                12,
            ),
            (&["workloads", "0", "rules", "1"], 14),
            (&["workloads", "0", "rules", "1", "methods", "0"], 14),
        ];
        for (parts, line) in cases {
            assert_eq!(index.line_of(&path(parts)), Some(*line), "{parts:?}");
        }
    }

    #[test]
    fn absent_field_falls_back_to_parent() {
        let index = LineIndex::build(TEXT);

        let absent = path(&["workloads", "0", "from_cookies"]);

        assert_eq!(index.line_of(&absent), Some(5));
    }

    #[test]
    fn duplicate_keys_with_lines() {
        let index = LineIndex::build("a:\n  b: 1\n  c: 2\n  b: 3\nd: [{e: 1, e: 2}]\n");

        assert_eq!(
            index.duplicate_keys(),
            [(path(&["a", "b"]), 4), (path(&["d", "0", "e"]), 5)]
        );
        assert_eq!(index.line_of(&path(&["a", "b"])), Some(2));
    }

    #[test]
    fn unparsable_text_has_no_lines() {
        let index = LineIndex::build("a: [1, 2\n");

        assert_eq!(index.line_of(&path(&["a"])), None);
    }
}
