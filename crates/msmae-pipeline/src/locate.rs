//! Where each key of a YAML document sits (line, column), so that errors found after
//! parsing — an unknown stage kind, a missing `needs`, a type error inside `with` — can
//! point at the offending line. serde_yaml reports positions only for its own errors, so
//! the document is scanned once more with yaml-rust2's marked event parser.

use std::collections::HashMap;

use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser};
use yaml_rust2::scanner::Marker;

/// Map from a dotted path (`stages.data.with.size`, `stages.x.needs.0`) to a 1-based
/// (line, column), both 1-based, of the key (or of the item, for sequence elements).
#[derive(Debug, Default, Clone)]
pub struct LocationIndex {
    map: HashMap<String, (usize, usize)>,
}

enum Frame {
    Map { path: String, key: Option<String>, expecting_key: bool },
    Seq { path: String, next: usize },
}

struct Builder {
    stack: Vec<Frame>,
    map: HashMap<String, (usize, usize)>,
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() { key.to_string() } else { format!("{path}.{key}") }
}

impl Builder {
    /// Called for every node that is a value (scalar or container start): returns its path.
    fn value_path(&mut self, mark: Marker) -> Option<String> {
        match self.stack.last_mut() {
            None => Some(String::new()),
            Some(Frame::Map { path, key, expecting_key }) => {
                *expecting_key = true;
                key.take().map(|k| join(path, &k))
            }
            Some(Frame::Seq { path, next }) => {
                let p = join(path, &next.to_string());
                *next += 1;
                self.map.entry(p.clone()).or_insert((mark.line(), mark.col() + 1));
                Some(p)
            }
        }
    }
}

impl MarkedEventReceiver for Builder {
    fn on_event(&mut self, ev: Event, mark: Marker) {
        match ev {
            Event::Scalar(value, ..) => {
                if let Some(Frame::Map { path, key, expecting_key }) = self.stack.last_mut()
                    && *expecting_key
                {
                    *expecting_key = false;
                    let p = join(path, &value);
                    self.map.entry(p).or_insert((mark.line(), mark.col() + 1));
                    *key = Some(value);
                    return;
                }
                self.value_path(mark);
            }
            Event::Alias(_) => {
                self.value_path(mark);
            }
            Event::MappingStart(..) => {
                let path = self.value_path(mark).unwrap_or_default();
                self.stack.push(Frame::Map { path, key: None, expecting_key: true });
            }
            Event::SequenceStart(..) => {
                let path = self.value_path(mark).unwrap_or_default();
                self.stack.push(Frame::Seq { path, next: 0 });
            }
            Event::MappingEnd | Event::SequenceEnd => {
                self.stack.pop();
            }
            _ => {}
        }
    }
}

impl LocationIndex {
    /// Index a document; a document that does not parse yields an empty index (serde_yaml
    /// reports the syntax error with its own position).
    pub fn build(src: &str) -> Self {
        let mut b = Builder { stack: Vec::new(), map: HashMap::new() };
        let mut parser = Parser::new_from_str(src);
        if parser.load(&mut b, false).is_err() {
            return Self::default();
        }
        Self { map: b.map }
    }

    /// Location of `path`, or of its nearest ancestor that has one.
    pub fn find(&self, path: &str) -> Option<(usize, usize)> {
        let mut p = path;
        loop {
            if let Some(l) = self.map.get(p) {
                return Some(*l);
            }
            match p.rfind('.') {
                Some(i) => p = &p[..i],
                None => return None,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_keys_items_and_falls_back_to_ancestors() {
        let src = "name: q\nstages:\n  data:\n    uses: ingest/synthetic\n    with: { size: 64, n: [1, 2] }\n  next:\n    needs:\n      - data\n      - other\n";
        let ix = LocationIndex::build(src);
        assert_eq!(ix.find("name"), Some((1, 1)));
        assert_eq!(ix.find("stages.data.uses"), Some((4, 5)));
        assert_eq!(ix.find("stages.data.with.size").map(|l| l.0), Some(5));
        assert_eq!(ix.find("stages.next.needs.1"), Some((9, 9)));
        assert_eq!(ix.find("stages.data.with.size.deeper"), ix.find("stages.data.with.size"));
        assert_eq!(ix.find("nothing"), None);
    }
}
