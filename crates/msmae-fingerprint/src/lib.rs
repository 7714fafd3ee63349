//! Build-time code fingerprint: a stage crate's `build.rs` calls [`emit`], which describes
//! the code a stage computes with and exports it as `MSMAE_CODE_FINGERPRINT`; the runner
//! folds it into each stage's cache key.
//!
//! What counts, and what does not:
//! - the crate's own sources and those of every `msmae-*` crate in its `[dependencies]`,
//!   transitively (build- and dev-dependencies do not compute the stage's output), each as
//!   a normalised token stream: comments, doc comments, whitespace, line breaks and the
//!   trailing commas and arm braces `rustfmt` adds or removes do not count, so a comment
//!   edit or a `cargo fmt` with another width keeps every key;
//! - the resolved versions (from `Cargo.lock`) of the external crates on that path that can
//!   change a stage's numbers or bytes ([`NUMERIC_CRATES`]: the ML stack, image codecs,
//!   Parquet/Arrow, RNGs, compression, JSON and chart writers). Runner-only crates (clap,
//!   indicatif, tracing, thiserror) never enter a key.
//!
//! The exported value is `v2;<digest>;<crate>=<digest>,…;<dep>=<version>,…`: the combined
//! digest (what the key hashes), then per crate and per dependency what `msmae why` needs
//! to name the part that changed.
//!
//! Why not the git tree hash: a build from a tarball or with uncommitted edits must still
//! produce honest keys, and a commit that touches only the runner must not invalidate
//! every trained model.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use proc_macro2::{Delimiter, TokenStream, TokenTree};

/// External crates whose version can change what a stage computes or writes: a name equal
/// to an entry, or starting with it followed by `-` or `_`.
pub const NUMERIC_CRATES: &[&str] = &[
    "burn",
    "tch",
    "torch-sys",
    "cubecl",
    "image",
    "png",
    "zune",
    "jpeg-decoder",
    "tiff",
    "fast_image_resize",
    "dicom",
    "parquet",
    "arrow",
    "polars",
    "rand",
    "safetensors",
    "half",
    "flate2",
    "miniz_oxide",
    "zstd",
    "snap",
    "lz4",
    "plotters",
    "ab_glyph",
    "serde_json",
    "ryu",
    "libm",
    "matrixmultiply",
    "gemm",
    "ndarray",
    "blake3",
];

/// Whether `name` is one of [`NUMERIC_CRATES`].
pub fn is_numeric(name: &str) -> bool {
    NUMERIC_CRATES.iter().any(|p| name == *p || name.strip_prefix(p).is_some_and(|rest| rest.starts_with(['-', '_'])))
}

/// Describe the calling crate (from `CARGO_MANIFEST_DIR`), print
/// `cargo:rustc-env=MSMAE_CODE_FINGERPRINT=…` and the `rerun-if-changed` lines.
///
/// # Panics
/// Build scripts report failure by panicking; this panics when the manifest dir is unset or
/// a source file cannot be read, with the path in the message.
pub fn emit() {
    let dir = std::env::var("CARGO_MANIFEST_DIR")
        .unwrap_or_else(|_| panic!("CARGO_MANIFEST_DIR is not set: call emit() from build.rs"));
    let fp = fingerprint(Path::new(&dir))
        .unwrap_or_else(|e| panic!("msmae-fingerprint: cannot hash sources under {dir}: {e}"));
    for f in &fp.files {
        println!("cargo:rerun-if-changed={}", f.display());
    }
    println!("cargo:rustc-env=MSMAE_CODE_FINGERPRINT={}", fp.encode());
}

/// What [`fingerprint`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fingerprint {
    /// Over every crate's normalised sources and the numeric dependencies' versions.
    pub digest: String,
    /// Per `msmae-*` crate on the path: the digest of its normalised sources.
    pub crates: BTreeMap<String, String>,
    /// Numeric external crates on the path → resolved version(s).
    pub deps: BTreeMap<String, String>,
    /// Files read (for `rerun-if-changed`).
    pub files: Vec<PathBuf>,
}

impl Fingerprint {
    /// The exported form: `v2;<digest>;<crate>=<digest>,…;<dep>=<version>,…`.
    pub fn encode(&self) -> String {
        let join =
            |m: &BTreeMap<String, String>| m.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(",");
        format!("v2;{};{};{}", self.digest, join(&self.crates), join(&self.deps))
    }
}

/// Describe a crate directory: its `msmae-*` sibling dependencies (transitively), their
/// normalised sources, and the numeric external crates they use as `Cargo.lock` resolves
/// them (the lock file is looked for in the directories above).
pub fn fingerprint(crate_dir: &Path) -> std::io::Result<Fingerprint> {
    let mut crates = BTreeSet::new();
    collect_crates(crate_dir, &mut crates)?;
    let mut files = Vec::new();
    let mut per_crate = BTreeMap::new();
    let mut direct: BTreeSet<String> = BTreeSet::new();
    for c in &crates {
        let name = c.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let mut h = blake3::Hasher::new_derive_key("msmae code fingerprint v2");
        let manifest = fs::read_to_string(c.join("Cargo.toml"))?;
        h.update(normalise_manifest(&manifest).as_bytes());
        files.push(c.join("Cargo.toml"));
        direct.extend(external_dependencies(&manifest));
        let mut crate_files = Vec::new();
        let src = c.join("src");
        if src.is_dir() {
            walk(&src, &mut crate_files)?;
        }
        crate_files.sort();
        for f in crate_files {
            let rel = f.strip_prefix(c).unwrap_or(&f).to_string_lossy().replace('\\', "/");
            let bytes = fs::read(&f)?;
            let body = if rel.ends_with(".rs") { normalise_rust(&bytes) } else { bytes };
            h.update(&(rel.len() as u64).to_le_bytes());
            h.update(rel.as_bytes());
            h.update(&(body.len() as u64).to_le_bytes());
            h.update(&body);
            files.push(f);
        }
        per_crate.insert(name, h.finalize().to_hex()[..16].to_string());
    }
    let mut deps = BTreeMap::new();
    if let Some(lock) = find_up(crate_dir, "Cargo.lock") {
        let text = fs::read_to_string(&lock)?;
        deps = numeric_closure(&parse_lock(&text), &per_crate.keys().cloned().collect(), &direct);
        files.push(lock);
    }
    let mut h = blake3::Hasher::new_derive_key("msmae code fingerprint v2");
    for (k, v) in per_crate.iter().chain(deps.iter()) {
        h.update(k.as_bytes());
        h.update(b"=");
        h.update(v.as_bytes());
        h.update(b"\n");
    }
    Ok(Fingerprint { digest: h.finalize().to_hex()[..32].to_string(), crates: per_crate, deps, files })
}

/// A Rust source as its token stream without comments, doc comments, layout, trailing
/// commas or the braces rustfmt puts around a match arm's expression. A file the tokenizer
/// cannot read counts byte for byte.
pub fn normalise_rust(bytes: &[u8]) -> Vec<u8> {
    let Ok(text) = std::str::from_utf8(bytes) else { return bytes.to_vec() };
    match TokenStream::from_str(text) {
        Ok(ts) => {
            let mut out = String::new();
            write_tokens(ts, &mut out);
            out.into_bytes()
        }
        Err(_) => bytes.to_vec(),
    }
}

fn is_doc_attr(g: &proc_macro2::Group) -> bool {
    g.delimiter() == Delimiter::Bracket
        && matches!(g.stream().into_iter().next(), Some(TokenTree::Ident(i)) if i == "doc")
}

fn write_tokens(ts: TokenStream, out: &mut String) {
    let tokens: Vec<TokenTree> = ts.into_iter().collect();
    let mut i = 0;
    while i < tokens.len() {
        match &tokens[i] {
            // `#[doc = "…"]` and `#![doc = "…"]`: what `///` and `//!` become.
            TokenTree::Punct(p) if p.as_char() == '#' => {
                let bang = matches!(tokens.get(i + 1), Some(TokenTree::Punct(b)) if b.as_char() == '!');
                let at = if bang { i + 2 } else { i + 1 };
                if let Some(TokenTree::Group(g)) = tokens.get(at)
                    && is_doc_attr(g)
                {
                    i = at + 1;
                    continue;
                }
                out.push_str("#\u{1}");
            }
            // A comma before a closing delimiter (rustfmt adds one where it breaks a list).
            TokenTree::Punct(p) if p.as_char() == ',' && i + 1 == tokens.len() => {}
            // The `;` ending a block's last statement when it diverges (`continue;`,
            // `return x;`, `break;`): `{ continue }` is the same block.
            TokenTree::Punct(p) if p.as_char() == ';' && i + 1 == tokens.len() && diverges(&tokens[..i]) => {}
            TokenTree::Punct(p)
                if p.as_char() == '>'
                    && i > 0
                    && matches!(&tokens[i - 1], TokenTree::Punct(q) if q.as_char() == '=') =>
            {
                out.push_str(">\u{1}");
                // `=> { expr }` is `=> expr,`, and `=> { return x; }` is `=> return x,`:
                // rustfmt wraps a long arm in braces.
                if let Some(TokenTree::Group(g)) = tokens.get(i + 1)
                    && g.delimiter() == Delimiter::Brace
                    && let Some(body) = arm_body(g.stream())
                {
                    write_tokens(body, out);
                    i += 2;
                    if matches!(tokens.get(i), Some(TokenTree::Punct(c)) if c.as_char() == ',') {
                        i += 1;
                    }
                    if i < tokens.len() {
                        out.push_str(",\u{1}");
                    }
                    continue;
                }
            }
            TokenTree::Punct(p) => {
                out.push(p.as_char());
                out.push('\u{1}');
            }
            TokenTree::Ident(id) => {
                out.push_str(&id.to_string());
                out.push('\u{1}');
            }
            TokenTree::Literal(l) => {
                out.push_str(&l.to_string());
                out.push('\u{1}');
            }
            // `|x| { expr }` is `|x| expr`: rustfmt braces a closure body it breaks.
            TokenTree::Group(g)
                if g.delimiter() == Delimiter::Brace
                    && i > 0
                    && matches!(&tokens[i - 1], TokenTree::Punct(p) if p.as_char() == '|')
                    && let Some(body) = arm_body(g.stream()) =>
            {
                write_tokens(body, out);
            }
            TokenTree::Group(g) => {
                let (open, close) = match g.delimiter() {
                    Delimiter::Parenthesis => ('(', ')'),
                    Delimiter::Bracket => ('[', ']'),
                    Delimiter::Brace => ('{', '}'),
                    Delimiter::None => ('\u{2}', '\u{3}'),
                };
                out.push(open);
                write_tokens(g.stream(), out);
                out.push(close);
            }
        }
        i += 1;
    }
}

/// The expression a braced match arm holds, when the braces are only rustfmt's: one
/// expression without a `;`, or one diverging statement (`return`, `break`, `continue`)
/// with its `;`. `None` for a real block.
fn arm_body(stream: TokenStream) -> Option<TokenStream> {
    let tokens: Vec<TokenTree> = stream.into_iter().collect();
    let semis: Vec<usize> = tokens
        .iter()
        .enumerate()
        .filter(|(_, t)| matches!(t, TokenTree::Punct(p) if p.as_char() == ';'))
        .map(|(i, _)| i)
        .collect();
    match semis.as_slice() {
        [] if !tokens.is_empty() => Some(tokens.into_iter().collect()),
        [last]
            if *last + 1 == tokens.len()
                && matches!(tokens.first(), Some(TokenTree::Ident(i)) if i == "return" || i == "break" || i == "continue") =>
        {
            Some(tokens.into_iter().take(*last).collect())
        }
        _ => None,
    }
}

/// Whether the last statement of `tokens` (after its last top-level `;`) starts with
/// `return`, `break` or `continue`.
fn diverges(tokens: &[TokenTree]) -> bool {
    let start =
        tokens.iter().rposition(|t| matches!(t, TokenTree::Punct(p) if p.as_char() == ';')).map_or(0, |k| k + 1);
    matches!(tokens.get(start), Some(TokenTree::Ident(i)) if i == "return" || i == "break" || i == "continue")
}

/// The parts of a `Cargo.toml` that change what is built: `[dependencies]` and
/// `[features]`, each line without comments or surrounding whitespace.
fn normalise_manifest(text: &str) -> String {
    let mut keep = false;
    let mut out = String::new();
    for line in text.lines() {
        let t = line.split('#').next().unwrap_or("").trim();
        if t.starts_with('[') {
            keep = t == "[dependencies]" || t == "[features]";
        }
        if keep && !t.is_empty() {
            out.push_str(&t.split_whitespace().collect::<Vec<_>>().join(" "));
            out.push('\n');
        }
    }
    out
}

/// Names in `[dependencies]` that are not `msmae-*`.
fn external_dependencies(manifest: &str) -> Vec<String> {
    dependency_names(manifest).into_iter().filter(|n| !n.starts_with("msmae-")).collect()
}

/// The crate names a `Cargo.toml`'s `[dependencies]` table lists (build- and
/// dev-dependencies left out).
pub fn dependency_names(manifest: &str) -> Vec<String> {
    let mut in_deps = false;
    let mut out = Vec::new();
    for line in manifest.lines() {
        let t = line.trim();
        if t.starts_with('[') {
            // Build- and dev-dependencies do not change what the stage computes.
            in_deps = t == "[dependencies]";
            continue;
        }
        if !in_deps || t.is_empty() || t.starts_with('#') {
            continue;
        }
        let name = t.split(['=', ' ', '.']).next().unwrap_or("");
        if !name.is_empty() {
            out.push(name.to_string());
        }
    }
    out
}

/// The crate itself plus every dependency named `msmae-*` found as a sibling directory.
fn collect_crates(dir: &Path, seen: &mut BTreeSet<PathBuf>) -> std::io::Result<()> {
    let dir = dir.canonicalize()?;
    if !seen.insert(dir.clone()) {
        return Ok(());
    }
    let manifest = fs::read_to_string(dir.join("Cargo.toml"))?;
    for name in dependency_names(&manifest) {
        if name.starts_with("msmae-")
            && name != "msmae-fingerprint"
            && let Some(parent) = dir.parent()
        {
            let sib = parent.join(&name);
            if sib.join("Cargo.toml").is_file() {
                collect_crates(&sib, seen)?;
            }
        }
    }
    Ok(())
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for entry in fs::read_dir(dir)? {
        let p = entry?.path();
        if p.is_dir() {
            walk(&p, out)?;
        } else {
            out.push(p);
        }
    }
    Ok(())
}

fn find_up(start: &Path, name: &str) -> Option<PathBuf> {
    let mut d = start.canonicalize().ok()?;
    loop {
        if d.join(name).is_file() {
            return Some(d.join(name));
        }
        d = d.parent()?.to_path_buf();
    }
}

/// One `[[package]]` of a `Cargo.lock`: name, version and dependency entries (`name` or
/// `name version` where the name alone is ambiguous).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LockedPackage {
    pub name: String,
    pub version: String,
    pub dependencies: Vec<String>,
}

/// The packages of a `Cargo.lock` (its regular TOML layout, read line by line).
pub fn parse_lock(text: &str) -> Vec<LockedPackage> {
    let mut out: Vec<LockedPackage> = Vec::new();
    let mut in_deps = false;
    for line in text.lines() {
        let t = line.trim();
        if t == "[[package]]" {
            out.push(LockedPackage { name: String::new(), version: String::new(), dependencies: Vec::new() });
            in_deps = false;
            continue;
        }
        let Some(p) = out.last_mut() else { continue };
        let unquote = |v: &str| v.trim().trim_end_matches(',').trim().trim_matches('"').to_string();
        if in_deps {
            if t.starts_with(']') {
                in_deps = false;
            } else if !t.is_empty() {
                p.dependencies.push(unquote(t));
            }
        } else if let Some(v) = t.strip_prefix("name = ") {
            p.name = unquote(v);
        } else if let Some(v) = t.strip_prefix("version = ") {
            p.version = unquote(v);
        } else if let Some(v) = t.strip_prefix("dependencies = [") {
            in_deps = !v.contains(']');
            for d in v.trim_end_matches(']').split(',').filter(|d| !d.trim().is_empty()) {
                p.dependencies.push(unquote(d));
            }
        }
    }
    out
}

/// The numeric crates reachable from `members`' lock entries through their direct external
/// dependencies named in `direct`, with their versions (several versions joined by `+`).
fn numeric_closure(
    lock: &[LockedPackage],
    members: &BTreeSet<String>,
    direct: &BTreeSet<String>,
) -> BTreeMap<String, String> {
    let find = |entry: &str| -> Option<&LockedPackage> {
        let mut it = entry.splitn(2, ' ');
        let name = it.next().unwrap_or("");
        let version = it.next();
        lock.iter().find(|p| p.name == name && version.is_none_or(|v| p.version == v))
    };
    let mut stack: Vec<&LockedPackage> = Vec::new();
    for m in members {
        for p in lock.iter().filter(|p| &p.name == m) {
            for d in &p.dependencies {
                let name = d.split(' ').next().unwrap_or("");
                if direct.contains(name)
                    && let Some(pkg) = find(d)
                {
                    stack.push(pkg);
                }
            }
        }
    }
    let mut seen: BTreeSet<(String, String)> = BTreeSet::new();
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    while let Some(p) = stack.pop() {
        if !seen.insert((p.name.clone(), p.version.clone())) {
            continue;
        }
        if is_numeric(&p.name) {
            out.entry(p.name.clone()).or_default().insert(p.version.clone());
        }
        stack.extend(p.dependencies.iter().filter_map(|d| find(d)));
    }
    out.into_iter().map(|(k, v)| (k, v.into_iter().collect::<Vec<_>>().join("+"))).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(p: &Path, s: &str) {
        fs::create_dir_all(p.parent().expect("test path has a parent")).expect("mkdir");
        fs::write(p, s).expect("write");
    }

    const LOCK: &str = r#"
[[package]]
name = "msmae-a"
version = "0.1.0"
dependencies = [
 "image",
 "msmae-b",
 "rand 0.9.2",
 "serde",
 "tracing",
]

[[package]]
name = "msmae-b"
version = "0.1.0"

[[package]]
name = "image"
version = "0.25.6"
dependencies = [
 "png",
 "syn",
]

[[package]]
name = "png"
version = "0.17.16"

[[package]]
name = "rand"
version = "0.8.5"

[[package]]
name = "rand"
version = "0.9.2"

[[package]]
name = "syn"
version = "2.0.1"

[[package]]
name = "tracing"
version = "0.1.44"

[[package]]
name = "serde"
version = "1.0.0"
"#;

    fn workspace() -> tempfile_dir::Dir {
        let t = tempfile_dir::Dir::new();
        write(&t.0.join("Cargo.lock"), LOCK);
        write(
            &t.0.join("crates/msmae-a/Cargo.toml"),
            "[package]\nname='msmae-a'\n[dependencies]\nmsmae-b = { workspace = true }\nimage.workspace = true\nrand = '0.9'\ntracing = '0.1'\n[dev-dependencies]\nmsmae-c.workspace = true\n",
        );
        write(
            &t.0.join("crates/msmae-a/src/lib.rs"),
            "//! a\n/// doc\npub fn a() -> u32 { match 1 { 1 => 2, _ => 3 } }\n",
        );
        write(&t.0.join("crates/msmae-b/Cargo.toml"), "[package]\nname='msmae-b'\n");
        write(&t.0.join("crates/msmae-b/src/lib.rs"), "pub const B: u32 = 1;");
        write(&t.0.join("crates/msmae-c/Cargo.toml"), "[package]\nname='msmae-c'\n");
        write(&t.0.join("crates/msmae-c/src/lib.rs"), "c");
        t
    }

    #[test]
    fn follows_msmae_dependencies_and_changes_with_what_they_compute() {
        let t = workspace();
        let a = t.0.join("crates/msmae-a");
        let f1 = fingerprint(&a).expect("hash");
        assert_eq!(f1.crates.keys().collect::<Vec<_>>(), ["msmae-a", "msmae-b"]);
        write(&t.0.join("crates/msmae-c/src/lib.rs"), "c2");
        assert_eq!(fingerprint(&a).expect("hash").digest, f1.digest, "a dev-dependency does not count");
        write(&t.0.join("crates/msmae-b/src/lib.rs"), "pub const B: u32 = 2;");
        let f2 = fingerprint(&a).expect("hash");
        assert_ne!(f2.digest, f1.digest, "a dependency's code counts");
        assert_eq!(f2.crates["msmae-a"], f1.crates["msmae-a"]);
        assert_ne!(f2.crates["msmae-b"], f1.crates["msmae-b"], "and is named");
    }

    #[test]
    fn comments_docs_layout_and_rustfmt_choices_do_not_count() {
        let t = workspace();
        let a = t.0.join("crates/msmae-a");
        let f1 = fingerprint(&a).expect("hash");
        let reformatted = "//! a, described at length\n\n/// another doc\n// a comment\npub fn a()\n    -> u32 {\n    match 1 {\n        1 => {\n            2\n        }\n        _ => 3,\n    }\n}\n";
        write(&a.join("src/lib.rs"), reformatted);
        assert_eq!(fingerprint(&a).expect("hash").digest, f1.digest);
        write(&a.join("src/lib.rs"), "pub fn a() -> u32 { match 1 { 1 => 2, _ => 4 } }\n");
        assert_ne!(fingerprint(&a).expect("hash").digest, f1.digest, "a changed number counts");
        assert_eq!(normalise_rust(b"f(a, b,)"), normalise_rust(b"f(\n    a,\n    b\n)"), "trailing commas");
        assert_eq!(
            normalise_rust(b"match x { Ok(_) => return Err(e), Err(e) => 1 }"),
            normalise_rust(b"match x { Ok(_) => {\n return Err(e);\n }\n Err(e) => 1 }"),
            "a diverging arm rustfmt braced"
        );
        assert_ne!(
            normalise_rust(b"match x { _ => { f(); g() } }"),
            normalise_rust(b"match x { _ => f() }"),
            "a real block counts"
        );
        assert_eq!(
            normalise_rust(b"v.map(|x| x + 1)"),
            normalise_rust(b"v.map(|x| {\n x + 1\n })"),
            "a closure body rustfmt braced"
        );
        assert_eq!(
            normalise_rust(b"let Some(x) = y else { continue };"),
            normalise_rust(b"let Some(x) = y else {\n continue;\n};"),
            "a diverging last statement"
        );
        assert_ne!(normalise_rust(b"{ f() }"), normalise_rust(b"{ f(); }"), "a value and a statement differ");
        assert_ne!(normalise_rust(b"f(\"a b\")"), normalise_rust(b"f(\"a  b\")"), "string contents count");
    }

    #[test]
    fn numeric_dependencies_come_from_the_lock_file_and_runner_crates_do_not() {
        let t = workspace();
        let a = t.0.join("crates/msmae-a");
        let f1 = fingerprint(&a).expect("hash");
        let deps: Vec<(&str, &str)> = f1.deps.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        assert_eq!(
            deps,
            [("image", "0.25.6"), ("png", "0.17.16"), ("rand", "0.9.2")],
            "tracing, serde and syn are not numeric; rand 0.8 is not used"
        );
        write(&t.0.join("Cargo.lock"), &LOCK.replace("0.17.16", "0.17.17"));
        let f2 = fingerprint(&a).expect("hash");
        assert_ne!(f2.digest, f1.digest);
        assert_eq!(f2.deps["png"], "0.17.17");
        write(&t.0.join("Cargo.lock"), &LOCK.replace("0.1.44", "0.1.45"));
        assert_eq!(fingerprint(&a).expect("hash").digest, f1.digest, "a runner-only crate never enters a key");
        assert!(f1.encode().starts_with(&format!("v2;{};msmae-a=", f1.digest)));
    }

    /// A temporary directory removed on drop (no dependency on the tempfile crate here).
    mod tempfile_dir {
        pub struct Dir(pub std::path::PathBuf);
        impl Dir {
            pub fn new() -> Self {
                static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
                let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let p = std::env::temp_dir().join(format!("msmae-fp-{}-{n}", std::process::id()));
                let _ = std::fs::remove_dir_all(&p);
                Dir(p)
            }
        }
        impl Drop for Dir {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
    }
}
