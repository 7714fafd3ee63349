//! What a stage declares it reads and writes. The runner binds a pipeline's `needs` to the
//! declared input slots by artifact kind and checks the produced files against the
//! declared output, so a stage cannot silently depend on or produce anything undeclared.

use std::fmt;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// The type of an artifact directory, e.g. `image-table`, `vit-checkpoint`, `attention-maps`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ArtifactKind(pub String);

impl ArtifactKind {
    pub fn new(s: impl Into<String>) -> Self {
        Self(s.into())
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ArtifactKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// How many upstream artifacts a slot takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Arity {
    One,
    Optional,
    Many,
}

/// A named input of a stage.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InputSlot {
    pub name: String,
    /// Kinds this slot accepts (e.g. a checkpoint slot accepts `vit-checkpoint` and
    /// `mae-checkpoint`).
    pub kinds: Vec<ArtifactKind>,
    pub arity: Arity,
    pub doc: String,
}

impl InputSlot {
    pub fn one(name: &str, kind: &str, doc: &str) -> Self {
        Self { name: name.into(), kinds: vec![ArtifactKind::new(kind)], arity: Arity::One, doc: doc.into() }
    }
    pub fn optional(name: &str, kind: &str, doc: &str) -> Self {
        Self { arity: Arity::Optional, ..Self::one(name, kind, doc) }
    }
    pub fn many(name: &str, kind: &str, doc: &str) -> Self {
        Self { arity: Arity::Many, ..Self::one(name, kind, doc) }
    }
    /// Accept a further artifact kind in this slot.
    pub fn or_kind(mut self, kind: &str) -> Self {
        self.kinds.push(ArtifactKind::new(kind));
        self
    }
    pub fn accepts(&self, kind: &ArtifactKind) -> bool {
        self.kinds.iter().any(|k| k == kind)
    }
}

/// The artifact a stage produces: its kind and the files it may contain.
///
/// Patterns are relative paths; `*` matches within one path component (`overlays/*.png`).
/// Patterns without `*` name files that must exist after a successful run.
///
/// It may also name the artifact's headline numbers ([`Self::metric`]) and tables
/// ([`Self::table`]) inside its JSON files: what `msmae show` and `msmae report` display,
/// read from the store without running anything.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutputDecl {
    pub kind: ArtifactKind,
    pub files: Vec<String>,
    pub metrics: Vec<ResultDecl>,
    pub tables: Vec<ResultDecl>,
    pub figures: Vec<FigureDecl>,
}

/// A figure of an artifact for the report: the PNG files matching `pattern` (a declared
/// file pattern, `overlays/*.png`), under `caption`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FigureDecl {
    pub caption: String,
    pub pattern: String,
}

/// Where one result of an artifact lives: the JSON value at `pointer` in `file`. The
/// pointer is RFC 6901 (`/a/0/b`), where an array index may also count from the end
/// (`/epochs/-1/train_loss`: the last epoch's) and a last segment `#` is the length of
/// the array or object it follows (`/epochs/#`: how many epochs ran).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResultDecl {
    pub name: String,
    pub file: String,
    pub pointer: String,
}

impl OutputDecl {
    pub fn new(kind: &str, files: &[&str]) -> Self {
        Self {
            kind: ArtifactKind::new(kind),
            files: files.iter().map(|s| s.to_string()).collect(),
            metrics: Vec::new(),
            tables: Vec::new(),
            figures: Vec::new(),
        }
    }

    /// Declare a headline number: the value at `pointer` in the JSON file `file`.
    pub fn metric(mut self, name: &str, file: &str, pointer: &str) -> Self {
        self.metrics.push(ResultDecl { name: name.into(), file: file.into(), pointer: pointer.into() });
        self
    }

    /// Declare a figure: the PNG files matching `pattern`, shown under `caption`.
    pub fn figure(mut self, caption: &str, pattern: &str) -> Self {
        self.figures.push(FigureDecl { caption: caption.into(), pattern: pattern.into() });
        self
    }

    /// Declare a table: an array of flat objects (one per row) at `pointer` in `file`.
    pub fn table(mut self, name: &str, file: &str, pointer: &str) -> Self {
        self.tables.push(ResultDecl { name: name.into(), file: file.into(), pointer: pointer.into() });
        self
    }

    /// Whether `rel` (a `/`-separated relative path) is declared.
    pub fn declares(&self, rel: &str) -> bool {
        self.files.iter().any(|p| glob_match(p, rel))
    }

    /// Declared files that must exist (patterns without wildcards).
    pub fn required(&self) -> impl Iterator<Item = &str> {
        self.files.iter().filter(|p| !p.contains('*')).map(String::as_str)
    }
}

/// The value at `pointer` in `v`: RFC 6901, where an array index may be negative (counting
/// from the end) and a last segment `#` is the length of what it follows.
pub fn json_at(v: &serde_json::Value, pointer: &str) -> Option<serde_json::Value> {
    if let Some(parent) = pointer.strip_suffix("/#") {
        return match json_ref(v, parent)? {
            serde_json::Value::Array(a) => Some(a.len().into()),
            serde_json::Value::Object(o) => Some(o.len().into()),
            _ => None,
        };
    }
    json_ref(v, pointer).cloned()
}

fn json_ref<'a>(v: &'a serde_json::Value, pointer: &str) -> Option<&'a serde_json::Value> {
    if pointer.is_empty() {
        return Some(v);
    }
    let mut cur = v;
    for raw in pointer.strip_prefix('/')?.split('/') {
        let part = raw.replace("~1", "/").replace("~0", "~");
        cur = match cur {
            serde_json::Value::Object(m) => m.get(&part)?,
            serde_json::Value::Array(a) => {
                let i: i64 = part.parse().ok()?;
                let i = if i < 0 { a.len() as i64 + i } else { i };
                a.get(usize::try_from(i).ok()?)?
            }
            _ => return None,
        };
    }
    Some(cur)
}

/// `*` matches any run of characters except `/`; everything else matches literally.
pub fn glob_match(pattern: &str, path: &str) -> bool {
    let p: Vec<&str> = pattern.split('/').collect();
    let s: Vec<&str> = path.split('/').collect();
    p.len() == s.len() && p.iter().zip(&s).all(|(p, s)| component_match(p.as_bytes(), s.as_bytes()))
}

fn component_match(p: &[u8], s: &[u8]) -> bool {
    match p.split_first() {
        None => s.is_empty(),
        Some((b'*', rest)) => (0..=s.len()).any(|i| component_match(rest, &s[i..])),
        Some((c, rest)) => s.first() == Some(c) && component_match(rest, &s[1..]),
    }
}

/// A committed upstream artifact, as a stage sees it: read-only.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InputArtifact {
    /// The upstream stage's name in the pipeline.
    pub stage: String,
    pub kind: ArtifactKind,
    /// Directory holding the artifact's files (do not write into it).
    pub dir: PathBuf,
    /// BLAKE3 digest of the artifact's manifest (its content address).
    pub digest: String,
}

impl InputArtifact {
    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.join(rel)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_pointers_count_array_indices_from_either_end() {
        let v = serde_json::json!({ "epochs": [{ "loss": 2.0 }, { "loss": 1.0 }], "a/b": { "~x": 3 } });
        assert_eq!(json_at(&v, "/epochs/-1/loss"), Some(serde_json::json!(1.0)));
        assert_eq!(json_at(&v, "/epochs/0/loss"), Some(serde_json::json!(2.0)));
        assert_eq!(json_at(&v, "/epochs/-3/loss"), None);
        assert_eq!(json_at(&v, "/epochs/2"), None);
        assert_eq!(json_at(&v, "/epochs/#"), Some(serde_json::json!(2)));
        assert_eq!(json_at(&v, "/a~1b/#"), Some(serde_json::json!(1)));
        assert_eq!(json_at(&v, "/epochs/0/loss/#"), None);
        assert_eq!(json_at(&v, "/a~1b/~0x"), Some(serde_json::json!(3)));
        assert_eq!(json_at(&v, "missing-slash"), None);
        assert_eq!(json_at(&v, ""), Some(v.clone()));
    }

    #[test]
    fn glob_matches_within_one_component() {
        assert!(glob_match("table.parquet", "table.parquet"));
        assert!(glob_match("overlays/*.png", "overlays/img_001.png"));
        assert!(!glob_match("overlays/*.png", "overlays/sub/img.png"));
        assert!(!glob_match("*.png", "a/b.png"));
        assert!(glob_match("*", "anything.bin"));
        assert!(!glob_match("table.parquet", "table.parquet.tmp"));
        assert!(glob_match("ckpt-*.bin", "ckpt-.bin"));
    }

    #[test]
    fn output_decl_lists_required_files() {
        let d = OutputDecl::new("image-table", &["images.parquet", "report.json", "previews/*.png"]);
        assert_eq!(d.required().collect::<Vec<_>>(), ["images.parquet", "report.json"]);
        assert!(d.declares("previews/x.png"));
        assert!(!d.declares("notes.txt"));
    }
}
