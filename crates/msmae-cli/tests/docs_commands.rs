//! Every `msmae` command the README and the docs show (in their `sh` blocks, directly or as
//! `cargo xtask run|msmae …`) names a subcommand and flags this binary has: a reader can
//! copy them as written.

use std::path::{Path, PathBuf};

use clap::CommandFactory;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The lines of the fenced `sh`/`bash`/`console` blocks of a Markdown text.
fn shell_lines(md: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut inside = false;
    for line in md.lines() {
        let t = line.trim_start();
        if let Some(lang) = t.strip_prefix("```") {
            inside = !inside && matches!(lang.trim(), "sh" | "bash" | "console" | "shell");
            continue;
        }
        if inside {
            let t = t.trim_start_matches("$ ");
            out.push(t.split(" #").next().unwrap_or(t).trim().to_string());
        }
    }
    out
}

/// `(subcommand, flags)` of an msmae invocation on `line`, if it is one.
fn invocation(line: &str) -> Option<(String, Vec<String>)> {
    let words: Vec<&str> = line.split_whitespace().collect();
    let at = words.iter().position(|w| *w == "msmae" || w.ends_with("/msmae"))?;
    let (sub, rest) = match (words.get(at.wrapping_sub(1)), words.get(at.wrapping_sub(2))) {
        // `cargo xtask msmae SUB …`
        (Some(&"xtask"), Some(&"cargo")) => (words.get(at + 1)?.to_string(), &words[at + 2..]),
        _ => (words.get(at + 1)?.to_string(), &words[at + 2..]),
    };
    let flags =
        rest.iter().filter(|w| w.starts_with("--")).map(|w| w.split('=').next().unwrap_or(w).to_string()).collect();
    Some((sub, flags))
}

#[test]
fn every_msmae_command_in_the_docs_exists_as_written() {
    let mut docs = vec![root().join("README.md")];
    for e in std::fs::read_dir(root().join("docs")).expect("docs/").flatten() {
        if e.path().extension().is_some_and(|x| x == "md") {
            docs.push(e.path());
        }
    }
    let cli = msmae_cli::Cli::command();
    let mut checked = 0;
    let mut problems = Vec::new();
    for d in &docs {
        let text = std::fs::read_to_string(d).unwrap_or_default();
        for line in shell_lines(&text) {
            // `cargo xtask [--cuda|--no-tch] run P …` is `msmae run P …` (those two flags are
            // cargo xtask's own: which build runs it).
            let line = if line.starts_with("cargo xtask ") {
                line.split_whitespace()
                    .filter(|w| !matches!(*w, "--cuda" | "--no-tch"))
                    .collect::<Vec<_>>()
                    .join(" ")
                    .replace("cargo xtask run ", "msmae run ")
            } else {
                line
            };
            let Some((sub, flags)) = invocation(&line) else { continue };
            checked += 1;
            let Some(cmd) = cli.find_subcommand(&sub) else {
                problems.push(format!("{}: `{line}`: no subcommand `{sub}`", d.display()));
                continue;
            };
            for f in flags {
                let name = f.trim_start_matches("--");
                let known = cmd.get_arguments().chain(cli.get_arguments()).any(|a| {
                    a.get_long() == Some(name)
                        || a.get_all_aliases().is_some_and(|al| al.contains(&name))
                        || a.get_visible_aliases().is_some_and(|al| al.contains(&name))
                }) || matches!(name, "help" | "version");
                if !known {
                    problems.push(format!("{}: `{line}`: `msmae {sub}` has no flag {f}", d.display()));
                }
            }
        }
    }
    assert!(checked >= 10, "found only {checked} msmae commands in the README and docs");
    assert!(problems.is_empty(), "commands in the docs that do not exist as written:\n  {}", problems.join("\n  "));
}

#[test]
fn invocations_are_read_from_shell_lines() {
    assert_eq!(
        invocation("msmae run p.yaml --stage masks --set a=1"),
        Some(("run".into(), vec!["--stage".into(), "--set".into()]))
    );
    assert_eq!(invocation("cargo xtask msmae status p.yaml"), Some(("status".into(), vec![])));
    assert_eq!(invocation("mpirun -np 2 msmae env"), Some(("env".into(), vec![])));
    assert_eq!(invocation("ls data"), None);
    assert_eq!(
        shell_lines("x\n```sh\nmsmae gc p --prune   # note\n```\n```yaml\nmsmae: no\n```\n"),
        ["msmae gc p --prune"]
    );
}
