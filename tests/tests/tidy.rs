//! Tidy checks in the style of rust-analyzer's: every Rust file opens with a `//!` line
//! saying what lives there, and no comment or Markdown document refers to a repository file
//! that does not exist (a renamed pipeline, a moved crate, a deleted script).

use std::fs;
use std::path::{Path, PathBuf};

/// The repository root (this crate is `tests/` directly below it).
fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().map(Path::to_path_buf).unwrap_or_default()
}

/// Files below `dir` whose name ends with one of `exts`, skipping build output, caches and
/// hidden folders.
fn files(dir: &Path, exts: &[&str], out: &mut Vec<PathBuf>) {
    let Ok(rd) = fs::read_dir(dir) else { return };
    for e in rd.flatten() {
        let p = e.path();
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') || name == "target" {
            continue;
        }
        if p.is_dir() {
            files(&p, exts, out);
        } else if exts.iter().any(|x| name.ends_with(x)) {
            out.push(p);
        }
    }
}

fn rust_files() -> Vec<PathBuf> {
    let mut v = Vec::new();
    for d in ["crates", "tests", "xtask"] {
        files(&root().join(d), &[".rs"], &mut v);
    }
    v
}

#[test]
fn every_rust_file_opens_with_a_module_doc() {
    let files = rust_files();
    assert!(files.len() > 50, "found only {} Rust files under {}", files.len(), root().display());
    let missing: Vec<String> = files
        .iter()
        .filter(|p| !fs::read_to_string(p).unwrap_or_default().trim_start_matches('\u{feff}').starts_with("//!"))
        .map(|p| p.strip_prefix(root()).unwrap_or(p).display().to_string())
        .collect();
    assert!(missing.is_empty(), "these files do not open with a `//!` line saying what lives there:\n  {}", missing.join("\n  "));
}

/// Repository paths mentioned in `text`: a run of path characters that starts with one of
/// the top-level folders, ends with a file extension, and holds no pattern characters.
fn mentioned_paths(text: &str) -> Vec<String> {
    const TOP: &[&str] = &["crates/", "pipelines/", "tests/", "xtask/", "data/", "docs/", ".ci/"];
    const EXT: &[&str] = &[".rs", ".yaml", ".md", ".py", ".toml", ".sh", ".png", ".txt"];
    let is_path = |c: char| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | '/');
    let mut out = Vec::new();
    let chars: Vec<(usize, char)> = text.char_indices().collect();
    let mut i = 0;
    while i < chars.len() {
        let (at, c) = chars[i];
        let starts = TOP.iter().any(|t| text[at..].starts_with(t));
        let boundary = i == 0 || !is_path(chars[i - 1].1);
        if starts && boundary && is_path(c) {
            let mut j = i;
            while j < chars.len() && is_path(chars[j].1) {
                j += 1;
            }
            let end = if j < chars.len() { chars[j].0 } else { text.len() };
            let p = text[at..end].trim_end_matches(['.', '/', '-']);
            let followed_by_pattern = j < chars.len() && matches!(chars[j].1, '*' | '<' | '{' | '$');
            // `data/` holds the datasets users bring: only its READMEs are in the repository.
            let user_data = p.starts_with("data/") && !p.ends_with(".md");
            if EXT.iter().any(|x| p.ends_with(x)) && !followed_by_pattern && !user_data {
                out.push(p.to_string());
            }
            i = j;
        } else {
            i += 1;
        }
    }
    out
}

#[test]
fn the_path_scanner_finds_paths_and_skips_patterns() {
    let t = "see `pipelines/quickstart.yaml`, crates/msmae-vit/src/mae.rs; not xcrates/a.rs nor data/*.png nor tests/python/{a}.py nor data/x/list.txt";
    assert_eq!(mentioned_paths(t), ["pipelines/quickstart.yaml", "crates/msmae-vit/src/mae.rs"]);
}

#[test]
fn documents_and_comments_refer_only_to_files_that_exist() {
    let root = root();
    let mut docs = Vec::new();
    for d in ["crates", "tests", "xtask", "data", "pipelines", "docs"] {
        files(&root.join(d), &[".md", ".yaml", ".py", ".txt", ".sh"], &mut docs);
    }
    docs.push(root.join("README.md"));
    let mut broken = Vec::new();
    let mut check = |file: &Path, text: &str| {
        for p in mentioned_paths(text) {
            // Relative to the repository root, or to the crate the file belongs to.
            let crate_dir = file.ancestors().find(|a| a.join("Cargo.toml").is_file()).unwrap_or(&root);
            if !root.join(&p).exists() && !crate_dir.join(&p).exists() {
                broken.push(format!("{}: {p}", file.strip_prefix(&root).unwrap_or(file).display()));
            }
        }
    };
    for f in &docs {
        check(f, &fs::read_to_string(f).unwrap_or_default());
    }
    for f in rust_files() {
        // Comments only: string literals in tests name files that must *not* exist.
        let text = fs::read_to_string(&f).unwrap_or_default();
        let comments: String = text.lines().filter_map(|l| l.trim_start().strip_prefix("//")).collect::<Vec<_>>().join("\n");
        check(&f, &comments);
    }
    assert!(broken.is_empty(), "references to files that do not exist:\n  {}", broken.join("\n  "));
}
