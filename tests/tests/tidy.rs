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
    assert!(
        missing.is_empty(),
        "these files do not open with a `//!` line saying what lives there:\n  {}",
        missing.join("\n  ")
    );
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
        let comments: String =
            text.lines().filter_map(|l| l.trim_start().strip_prefix("//")).collect::<Vec<_>>().join("\n");
        check(&f, &comments);
    }
    assert!(broken.is_empty(), "references to files that do not exist:\n  {}", broken.join("\n  "));
}

/// The dependency rules of ARCHITECTURE.md's table (`| crate | may depend on |`): every
/// crate has a row, and depends on no `msmae-*` crate its row does not allow. The runner
/// never sees burn, a library never depends on a stage crate, and the code fingerprint of a
/// stage covers only what it computes with, because of these rules.
#[test]
fn every_crate_depends_only_on_what_the_architecture_allows() {
    let doc = fs::read_to_string(root().join("ARCHITECTURE.md")).expect("ARCHITECTURE.md at the repository root");
    let mut allowed: std::collections::BTreeMap<String, Vec<String>> = Default::default();
    let mut in_table = false;
    for line in doc.lines() {
        let cells: Vec<&str> = line.trim().trim_matches('|').split('|').map(str::trim).collect();
        if cells.len() == 2 && cells[0] == "crate" && cells[1] == "may depend on" {
            in_table = true;
            continue;
        }
        if in_table && !line.trim_start().starts_with('|') {
            in_table = false;
        }
        if in_table && cells.len() == 2 && cells[0].trim_matches('`').starts_with("msmae-") {
            let deps = cells[1]
                .split(',')
                .map(|d| d.trim().trim_matches('`').to_string())
                .filter(|d| d.starts_with("msmae-"))
                .collect();
            allowed.insert(cells[0].trim_matches('`').to_string(), deps);
        }
    }
    assert!(!allowed.is_empty(), "ARCHITECTURE.md has no `| crate | may depend on |` table");
    let mut problems = Vec::new();
    for e in fs::read_dir(root().join("crates")).expect("crates/").flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Ok(manifest) = fs::read_to_string(e.path().join("Cargo.toml")) else { continue };
        let Some(ok) = allowed.get(&name) else {
            problems.push(format!("{name}: no row in ARCHITECTURE.md's dependency table"));
            continue;
        };
        for d in msmae_fingerprint::dependency_names(&manifest).into_iter().filter(|d| d.starts_with("msmae-")) {
            if !ok.contains(&d) {
                problems.push(format!("{name} depends on {d}, which ARCHITECTURE.md does not allow"));
            }
        }
    }
    assert!(problems.is_empty(), "crate dependencies break the architecture's rules:\n  {}", problems.join("\n  "));
}

/// Words that narrate the project's history or cite its tracker: they belong in
/// CHANGELOG.md, not in what describes the product as it is.
fn narration(text: &str) -> Vec<String> {
    let lower = text.to_lowercase();
    let mut out = Vec::new();
    for (n, line) in lower.lines().enumerate() {
        let words: Vec<&str> = line.split(|c: char| !c.is_alphanumeric()).filter(|w| !w.is_empty()).collect();
        for w in words.windows(2) {
            if matches!(w[0], "issue" | "session") && w[1].chars().all(|c| c.is_ascii_digit()) {
                out.push(format!("line {}: `{} {}`", n + 1, w[0], w[1]));
            }
        }
        for phrase in [
            "before the rewrite",
            "after the rewrite",
            "development round",
            "loader rewrite",
            "this session",
            "last session",
        ] {
            if line.contains(phrase) {
                out.push(format!("line {}: `{phrase}`", n + 1));
            }
        }
    }
    out
}

#[test]
fn docs_pipelines_scripts_and_comments_speak_of_the_product_as_it_is() {
    let root = root();
    let mut docs = Vec::new();
    for d in ["crates", "tests", "xtask", "docs", "pipelines", "scripts", "data"] {
        files(&root.join(d), &[".md", ".yaml", ".sh"], &mut docs);
    }
    docs.extend(["README.md", "ARCHITECTURE.md"].iter().map(|f| root.join(f)));
    let mut found = Vec::new();
    for f in &docs {
        for hit in narration(&fs::read_to_string(f).unwrap_or_default()) {
            found.push(format!("{}: {hit}", f.strip_prefix(&root).unwrap_or(f).display()));
        }
    }
    for f in rust_files() {
        let text = fs::read_to_string(&f).unwrap_or_default();
        let comments: String =
            text.lines().map(|l| l.trim_start().strip_prefix("//").unwrap_or("")).collect::<Vec<_>>().join("\n");
        for hit in narration(&comments) {
            found.push(format!("{}: {hit}", f.strip_prefix(&root).unwrap_or(&f).display()));
        }
    }
    assert!(
        found.is_empty(),
        "history narration or tracker numbers (put them in CHANGELOG.md):\n  {}",
        found.join("\n  ")
    );
}

#[test]
fn the_narration_check_finds_what_it_should() {
    assert_eq!(
        narration("as of issue 17 and Session 7;\nafter the loader rewrite"),
        ["line 1: `issue 17`", "line 1: `session 7`", "line 2: `loader rewrite`"]
    );
    assert!(narration("repeat: 3 — round 2 uses seed 2; an issue with the data; issues 3").is_empty());
}

/// Every `docs/method.md §N` (or `§N.M`) a comment, pipeline or document cites is a heading
/// of docs/method.md.
#[test]
fn every_method_section_that_is_cited_exists() {
    let root = root();
    let method = fs::read_to_string(root.join("docs/method.md")).expect("docs/method.md");
    let headings: Vec<String> = method
        .lines()
        .filter(|l| l.starts_with('#'))
        .filter_map(|l| l.split_whitespace().nth(1).filter(|w| w.starts_with('§')).map(str::to_string))
        .collect();
    assert!(headings.len() >= 5, "docs/method.md has numbered (§) headings: {headings:?}");
    let mut sources = rust_files();
    for d in ["pipelines", "docs", "crates", "scripts"] {
        files(&root.join(d), &[".md", ".yaml", ".sh"], &mut sources);
    }
    sources.extend(["README.md", "ARCHITECTURE.md"].iter().map(|f| root.join(f)));
    let mut missing = Vec::new();
    for f in sources {
        let raw = fs::read_to_string(&f).unwrap_or_default();
        // Everything, string literals included (a stage's summary cites sections too), but
        // this file, which spells the pattern itself.
        let text = if f.ends_with("tests/tidy.rs") { String::new() } else { raw };
        for (i, _) in text.match_indices("method.md §") {
            let cited: String = text[i + "method.md ".len()..]
                .chars()
                .take_while(|c| *c == '§' || c.is_ascii_digit() || *c == '.')
                .collect();
            let cited = cited.trim_end_matches('.').to_string();
            if !headings.contains(&cited) {
                missing.push(format!("{}: {cited}", f.strip_prefix(&root).unwrap_or(&f).display()));
            }
        }
    }
    assert!(
        missing.is_empty(),
        "cited sections of docs/method.md that are not headings there:\n  {}",
        missing.join("\n  ")
    );
}
