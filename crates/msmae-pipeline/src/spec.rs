//! The pipeline file: parsing, `${...}` interpolation, `--set` overrides, and expansion
//! of repeated rounds into plain stages.
//!
//! ```yaml
//! name: quickstart
//! seed: 17
//! params: { size: 64 }
//! stages:
//!   data:  { uses: ingest/synthetic, with: { size: "${params.size}" } }
//!   attn:  { uses: attention/extract, needs: { checkpoint: supervised, images: data } }
//!   refresh:                       # a group: stamped out as refresh.1.*, refresh.2.*, ...
//!     repeat: 2
//!     init: { pretrain: pretrain } # what ${prev.pretrain} means in round 1
//!     stages:
//!       attn:     { uses: attention/extract, needs: ["${prev.pretrain}", data] }
//!       pretrain: { uses: mae/pretrain, needs: [data, attn], with: { round: "${round}" } }
//!   ft: { uses: finetune/msmae, needs: [refresh.last.pretrain, data] }
//! ```
//! `GROUP.last.STAGE` names the final round's stage, `GROUP.*.STAGE` every round's; a
//! stage's `seed:` may be `"${round}"`, so a group can stand for several seeds.
//! A `${...}` that is the whole string keeps the referenced value's type (a number stays a
//! number); inside a longer string it is formatted into it. `$${` writes a literal `${`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::Value as Json;
use serde_yaml::Value as Yaml;

use crate::error::{SpecError, SpecErrors};
use crate::locate::LocationIndex;

const TOP_KEYS: &[&str] = &["name", "description", "seed", "params", "stages"];
const STAGE_KEYS: &[&str] = &["uses", "needs", "with", "seed", "description", "resources"];
const GROUP_KEYS: &[&str] = &["repeat", "init", "stages", "description", "seed"];

/// A parsed, expanded pipeline.
#[derive(Debug, Clone)]
pub struct PipelineSpec {
    pub file: PathBuf,
    /// Directory of the pipeline file: relative paths in configs are resolved against it.
    pub base_dir: PathBuf,
    pub name: String,
    pub description: Option<String>,
    pub seed: u64,
    pub params: Json,
    /// Stages in file order, rounds expanded.
    pub stages: Vec<StageSpec>,
    pub index: LocationIndex,
}

/// One stage after expansion and interpolation.
#[derive(Debug, Clone, PartialEq)]
pub struct StageSpec {
    pub name: String,
    pub uses: String,
    pub needs: Needs,
    pub with: Json,
    pub seed: u64,
    pub description: Option<String>,
    /// What the stage's Slurm job asks for (`resources:`); never part of the cache key.
    pub resources: crate::slurm::StageResources,
    /// Dotted YAML path of the definition, for error locations.
    pub src: String,
}

/// Upstream stages: a list (bound to input slots by artifact kind) or slot → stages.
#[derive(Debug, Clone, PartialEq)]
pub enum Needs {
    List(Vec<Need>),
    Slots(BTreeMap<String, Vec<Need>>),
}

/// One upstream reference and where it was written.
#[derive(Debug, Clone, PartialEq)]
pub struct Need {
    pub stage: String,
    pub src: String,
}

impl Needs {
    pub fn all(&self) -> Vec<&Need> {
        match self {
            Needs::List(v) => v.iter().collect(),
            Needs::Slots(m) => m.values().flatten().collect(),
        }
    }
}

impl PipelineSpec {
    pub fn stage(&self, name: &str) -> Option<&StageSpec> {
        self.stages.iter().find(|s| s.name == name)
    }

    pub(crate) fn error(&self, key: &str, message: impl Into<String>) -> SpecError {
        located(&self.file, &self.index, key, message)
    }
}

fn located(file: &Path, index: &LocationIndex, key: &str, message: impl Into<String>) -> SpecError {
    let (line, column) = index.find(key).unwrap_or((0, 0));
    SpecError { file: file.to_path_buf(), line, column, key: key.to_string(), message: message.into() }
}

/// `--set params.size=32` style overrides: a dotted path under `params` (or `seed`) and a
/// YAML scalar or flow value.
#[derive(Debug, Clone, PartialEq)]
pub struct Override {
    pub path: String,
    pub value: String,
}

impl std::str::FromStr for Override {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (path, value) =
            s.split_once('=').ok_or_else(|| format!("`{s}`: expected KEY=VALUE, e.g. params.size=32"))?;
        let path = path.trim();
        if path != "seed" && path != "name" && !path.starts_with("params.") {
            return Err(format!("`{path}`: only `seed`, `name` and `params.*` can be set from the command line"));
        }
        Ok(Override { path: path.to_string(), value: value.to_string() })
    }
}

/// Read and parse a pipeline file.
pub fn load(file: &Path, overrides: &[Override]) -> Result<PipelineSpec, crate::Error> {
    let bytes = std::fs::read(file).map_err(|source| crate::Error::Read { path: file.to_path_buf(), source })?;
    let src = String::from_utf8(bytes).map_err(|e| {
        let at = e.utf8_error().valid_up_to();
        let line = e.as_bytes()[..at].iter().filter(|&&b| b == b'\n').count() + 1;
        let message = format!("not UTF-8 text (invalid byte at offset {at}): a pipeline file is YAML in UTF-8");
        SpecErrors(vec![SpecError { file: file.to_path_buf(), line, column: 0, key: String::new(), message }])
    })?;
    Ok(parse(file, &src, overrides)?)
}

/// How deeply flow collections (`[…]`, `{…}`) and indented blocks may nest in a pipeline
/// file: far beyond any real pipeline, and checked before the YAML parser sees the text,
/// whose time grows with the depth.
pub const MAX_NESTING: usize = 64;

/// The deepest nesting of `text`: flow brackets outside quotes and comments, and the number
/// of distinct indentation levels open at once.
fn nesting_depth(text: &str) -> (usize, usize) {
    let mut worst = (0usize, 0usize);
    let mut depth = 0usize;
    let mut indents: Vec<usize> = Vec::new();
    for (line_no, line) in (1usize..).zip(text.lines()) {
        let trimmed = line.trim_start_matches(' ');
        if depth == 0 && !trimmed.is_empty() && !trimmed.starts_with('#') {
            let indent = line.len() - trimmed.len();
            while indents.last().is_some_and(|&i| i >= indent) {
                indents.pop();
            }
            indents.push(indent);
            if indents.len() > worst.0 {
                worst = (indents.len(), line_no);
            }
        }
        let mut quote: Option<char> = None;
        let mut prev = ' ';
        for c in line.chars() {
            match quote {
                Some(q) if c == q => quote = None,
                Some(_) => {}
                None if c == '#' && (prev == ' ' || prev == '\t') => break,
                None if c == '"' || c == '\'' => quote = Some(c),
                None if c == '[' || c == '{' => {
                    depth += 1;
                    if depth > worst.0 {
                        worst = (depth, line_no);
                    }
                }
                None if c == ']' || c == '}' => depth = depth.saturating_sub(1),
                None => {}
            }
            prev = c;
        }
    }
    worst
}

/// Parse pipeline text (`file` names it in errors and anchors relative paths).
pub fn parse(file: &Path, src: &str, overrides: &[Override]) -> Result<PipelineSpec, SpecErrors> {
    let (depth, line) = nesting_depth(src);
    if depth > MAX_NESTING {
        let message = format!("nested {depth} levels deep (at most {MAX_NESTING}): this is not a pipeline file");
        return Err(SpecErrors(vec![SpecError {
            file: file.to_path_buf(),
            line,
            column: 0,
            key: String::new(),
            message,
        }]));
    }
    let index = LocationIndex::build(src);
    let mut errs = Errors { file, index: &index, list: Vec::new() };
    let mut doc: Yaml = match serde_yaml::from_str(src) {
        Ok(v) => v,
        Err(e) => {
            let (line, column) = e.location().map(|l| (l.line(), l.column())).unwrap_or((0, 0));
            let message = format!("invalid YAML: {e}");
            return Err(SpecErrors(vec![SpecError {
                file: file.to_path_buf(),
                line,
                column,
                key: String::new(),
                message,
            }]));
        }
    };
    if doc.is_null() {
        errs.at("", "the file is empty: a pipeline needs at least a `stages:` map");
        return Err(SpecErrors(errs.list));
    }
    let Some(top) = doc.as_mapping_mut() else {
        errs.at("", "a pipeline file must be a map with `stages:` (and optionally name, seed, params)");
        return Err(SpecErrors(errs.list));
    };
    apply_overrides(top, overrides, &mut errs);
    for key in top.keys() {
        match key.as_str() {
            Some(k) if TOP_KEYS.contains(&k) => {}
            Some(k) => errs.at(k, unknown_key(k, TOP_KEYS)),
            None => errs.at("", format!("keys must be strings, found {key:?}")),
        }
    }
    // The name is a path component (TensorBoard logs, Slurm scripts): a file stem is made
    // one, a written name must be one.
    let default_name: String = file
        .file_stem()
        .map(|s| {
            s.to_string_lossy()
                .chars()
                .map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '_' })
                .collect()
        })
        .filter(|s: &String| !s.is_empty())
        .unwrap_or_else(|| "pipeline".into());
    let name = match top.get("name") {
        None => default_name,
        Some(Yaml::String(s)) if valid_name(s) => s.clone(),
        Some(v) => {
            errs.at(
                "name",
                format!("must be a name of letters, digits, `-` and `_` (it names folders), found {}", show(v)),
            );
            default_name
        }
    };
    let description = top.get("description").and_then(|d| d.as_str()).map(str::to_string);
    let seed = match top.get("seed") {
        None => 0,
        Some(v) => v.as_u64().unwrap_or_else(|| {
            errs.at("seed", format!("must be a non-negative integer, found {}", show(v)));
            0
        }),
    };
    let params = match top.get("params") {
        None | Some(Yaml::Null) => Json::Object(Default::default()),
        Some(v @ Yaml::Mapping(_)) => to_json(v).unwrap_or_else(|m| {
            errs.at("params", m);
            Json::Null
        }),
        Some(v) => {
            errs.at("params", format!("must be a map of name: value, found {}", show(v)));
            Json::Null
        }
    };
    let mut stages = parse_stages(
        top.get("stages"),
        &Vars { params: &params, seed, name: &name, round: None, prev: None },
        &mut errs,
    );
    resolve_last_rounds(&mut stages);
    if !errs.list.is_empty() {
        return Err(SpecErrors(errs.list));
    }
    let base_dir = file.parent().map(Path::to_path_buf).unwrap_or_default();
    let base_dir = if base_dir.as_os_str().is_empty() { PathBuf::from(".") } else { base_dir };
    Ok(PipelineSpec { file: file.to_path_buf(), base_dir, name, description, seed, params, stages, index })
}

/// `--set path=value` overrides, each value parsed as YAML.
fn apply_overrides(top: &mut serde_yaml::Mapping, overrides: &[Override], errs: &mut Errors<'_>) {
    for o in overrides {
        if let Some(rest) = o.path.strip_prefix("params.")
            && let Err(message) = check_param_path(top.get("params"), rest)
        {
            errs.at(&o.path, format!("--set {}={}: {message}", o.path, o.value));
            continue;
        }
        let value: Yaml = match serde_yaml::from_str(&o.value) {
            Ok(v) => v,
            Err(e) => {
                errs.at(&o.path, format!("--set {}={}: not a YAML value: {e}", o.path, o.value));
                continue;
            }
        };
        set_path(top, &o.path, value);
    }
}

/// The `stages:` map: plain stages and `repeat:` groups expanded into rounds.
fn parse_stages(node: Option<&Yaml>, vars: &Vars<'_>, errs: &mut Errors<'_>) -> Vec<StageSpec> {
    let mut stages = Vec::new();
    match node {
        None => errs.at("", "missing `stages:` map"),
        Some(Yaml::Mapping(m)) if m.is_empty() => errs.at("stages", "no stages defined"),
        Some(Yaml::Mapping(m)) => {
            for (k, v) in m {
                let Some(sname) = k.as_str() else {
                    errs.at("stages", format!("stage names must be strings, found {}", show(k)));
                    continue;
                };
                let path = format!("stages.{sname}");
                if !valid_name(sname) {
                    errs.at(&path, format!("stage name `{sname}`: use letters, digits, `-` and `_` only"));
                    continue;
                }
                if v.as_mapping().is_some_and(|m| m.contains_key("repeat")) {
                    expand_group(sname, v, &path, vars, errs, &mut stages);
                } else if let Some(s) = parse_stage(sname, v, &path, vars, None, errs) {
                    stages.push(s);
                }
            }
        }
        Some(v) => errs.at("stages", format!("must be a map of stage name → stage, found {}", show(v))),
    }
    stages
}

/// `group.last.x` in `needs` means the group's final round; `group.*.x` every round of
/// it, in order (e.g. the evals of a `repeat:` group of seeds into one `eval/compare`).
fn resolve_last_rounds(stages: &mut [StageSpec]) {
    let last: BTreeMap<String, u64> = stages
        .iter()
        .filter_map(|s| {
            let mut it = s.name.splitn(3, '.');
            let (g, r) = (it.next()?, it.next()?.parse::<u64>().ok()?);
            Some((g.to_string(), r))
        })
        .fold(BTreeMap::new(), |mut m, (g, r)| {
            let e = m.entry(g).or_insert(0);
            *e = (*e).max(r);
            m
        });
    let fix = |n: Need| -> Vec<Need> {
        let parts: Vec<&str> = n.stage.splitn(3, '.').collect();
        match (parts.as_slice(), parts.first().and_then(|g| last.get(*g))) {
            ([g, "last", x], Some(r)) => vec![Need { stage: format!("{g}.{r}.{x}"), ..n.clone() }],
            ([g, "*", x], Some(r)) => (1..=*r).map(|k| Need { stage: format!("{g}.{k}.{x}"), ..n.clone() }).collect(),
            _ => vec![n],
        }
    };
    for s in stages {
        match &mut s.needs {
            Needs::List(v) => *v = std::mem::take(v).into_iter().flat_map(fix).collect(),
            Needs::Slots(m) => m.values_mut().for_each(|v| *v = std::mem::take(v).into_iter().flat_map(fix).collect()),
        }
    }
}

struct Errors<'a> {
    file: &'a Path,
    index: &'a LocationIndex,
    list: Vec<SpecError>,
}

impl Errors<'_> {
    fn at(&mut self, key: &str, message: impl Into<String>) {
        self.list.push(located(self.file, self.index, key, message));
    }
}

fn valid_name(s: &str) -> bool {
    !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

fn unknown_key(k: &str, allowed: &[&str]) -> String {
    let near = allowed.iter().filter(|a| msmae_core::stage::edit_distance(k, a) <= 2).collect::<Vec<_>>();
    let hint = match near.first() {
        Some(n) => format!(" (did you mean `{n}`?)"),
        None => String::new(),
    };
    format!("unknown key `{k}`{hint}; expected one of: {}", allowed.join(", "))
}

fn show(v: &Yaml) -> String {
    match v {
        Yaml::Null => "null".into(),
        Yaml::Bool(b) => format!("boolean {b}"),
        Yaml::Number(n) => format!("number {n}"),
        Yaml::String(s) => format!("string {s:?}"),
        Yaml::Sequence(_) => "a list".into(),
        Yaml::Mapping(_) => "a map".into(),
        Yaml::Tagged(t) => format!("tagged value {}", t.tag),
    }
}

fn to_json(v: &Yaml) -> Result<Json, String> {
    serde_json::to_value(v).map_err(|e| format!("cannot be represented as data: {e}"))
}

/// A `--set params.…` path must name a parameter the file declares (a misspelt name would
/// otherwise be accepted and change nothing).
fn check_param_path(params: Option<&Yaml>, rest: &str) -> Result<(), String> {
    let mut cur = params;
    let mut seen = String::from("params");
    for part in rest.split('.') {
        let map = match cur {
            Some(Yaml::Mapping(m)) => m,
            _ => return Err(format!("`{seen}` is not a map of parameters in this pipeline file")),
        };
        let names: Vec<&str> = map.keys().filter_map(|k| k.as_str()).collect();
        match map.get(part) {
            Some(v) => cur = Some(v),
            None => {
                let near = names
                    .iter()
                    .filter(|n| msmae_core::stage::edit_distance(part, n) <= 2)
                    .min_by_key(|n| msmae_core::stage::edit_distance(part, n));
                let hint = near.map(|n| format!(" (did you mean `{seen}.{n}`?)")).unwrap_or_default();
                let known = if names.is_empty() { "none".to_string() } else { names.join(", ") };
                return Err(format!("no parameter `{part}` in `{seen}`{hint}; declared: {known}"));
            }
        }
        seen = format!("{seen}.{part}");
    }
    Ok(())
}

fn set_path(top: &mut serde_yaml::Mapping, path: &str, value: Yaml) {
    let mut parts = path.split('.').peekable();
    let mut cur = top;
    while let Some(p) = parts.next() {
        let key = Yaml::String(p.to_string());
        if parts.peek().is_none() {
            cur.insert(key, value);
            return;
        }
        let entry = cur.entry(key).or_insert_with(|| Yaml::Mapping(Default::default()));
        if !entry.is_mapping() {
            *entry = Yaml::Mapping(Default::default());
        }
        let Yaml::Mapping(m) = entry else { return };
        cur = m;
    }
}

/// What `${...}` can refer to.
struct Vars<'a> {
    params: &'a Json,
    seed: u64,
    name: &'a str,
    round: Option<u64>,
    prev: Option<&'a BTreeMap<String, String>>,
}

impl Vars<'_> {
    fn lookup(&self, expr: &str) -> Result<Json, String> {
        let expr = expr.trim();
        match expr {
            "seed" => return Ok(Json::from(self.seed)),
            "name" => return Ok(Json::from(self.name)),
            "round" => {
                return self
                    .round
                    .map(Json::from)
                    .ok_or_else(|| "`${round}` is only defined inside a `repeat:` group".into());
            }
            _ => {}
        }
        if let Some(p) = expr.strip_prefix("params.") {
            let mut cur = self.params;
            for part in p.split('.') {
                cur = cur.get(part).ok_or_else(|| format!("`${{{expr}}}`: no parameter `{p}` under `params:`"))?;
            }
            return Ok(cur.clone());
        }
        if let Some(x) = expr.strip_prefix("prev.") {
            let prev = self.prev.ok_or_else(|| format!("`${{{expr}}}` is only defined inside a `repeat:` group"))?;
            return prev.get(x).cloned().map(Json::from).ok_or_else(|| {
                format!("`${{{expr}}}`: round 1 has no previous `{x}`; name it in the group's `init:` map")
            });
        }
        Err(format!("`${{{expr}}}`: unknown reference; use params.NAME, seed, name, round or prev.STAGE"))
    }

    /// Interpolate every string inside `v`.
    fn apply(&self, v: &Json) -> Result<Json, String> {
        Ok(match v {
            Json::String(s) => self.apply_str(s)?,
            Json::Array(a) => Json::Array(a.iter().map(|x| self.apply(x)).collect::<Result<_, _>>()?),
            Json::Object(o) => {
                Json::Object(o.iter().map(|(k, x)| Ok((k.clone(), self.apply(x)?))).collect::<Result<_, String>>()?)
            }
            other => other.clone(),
        })
    }

    fn apply_str(&self, s: &str) -> Result<Json, String> {
        if let Some(inner) = s.strip_prefix("${").and_then(|r| r.strip_suffix('}'))
            && !inner.contains("${")
            && !inner.contains('}')
        {
            return self.lookup(inner);
        }
        let mut out = String::new();
        let mut rest = s;
        while let Some(i) = rest.find("${") {
            if i > 0 && rest.as_bytes()[i - 1] == b'$' {
                out.push_str(&rest[..i - 1]);
                out.push_str("${");
                rest = &rest[i + 2..];
                continue;
            }
            out.push_str(&rest[..i]);
            let end = rest[i..].find('}').ok_or_else(|| format!("unclosed `${{` in {s:?}"))?;
            match self.lookup(&rest[i + 2..i + end])? {
                Json::String(x) => out.push_str(&x),
                Json::Number(n) => out.push_str(&n.to_string()),
                Json::Bool(b) => out.push_str(&b.to_string()),
                other => return Err(format!("{s:?}: cannot format {other} inside a string")),
            }
            rest = &rest[i + end + 1..];
        }
        out.push_str(rest);
        Ok(Json::String(out))
    }
}

fn check_keys(v: &serde_yaml::Mapping, path: &str, allowed: &[&str], errs: &mut Errors<'_>) {
    for k in v.keys() {
        match k.as_str() {
            Some(s) if allowed.contains(&s) => {}
            Some(s) => errs.at(&format!("{path}.{s}"), unknown_key(s, allowed)),
            None => errs.at(path, format!("keys must be strings, found {}", show(k))),
        }
    }
}

/// Parse one stage definition. `group` carries (group name, round, member names) inside a
/// `repeat:` group, where bare member names refer to the same round.
fn parse_stage(
    name: &str,
    v: &Yaml,
    path: &str,
    vars: &Vars<'_>,
    group: Option<(&str, u64, &[String])>,
    errs: &mut Errors<'_>,
) -> Option<StageSpec> {
    let Some(m) = v.as_mapping() else {
        errs.at(path, format!("a stage must be a map with `uses:`, found {}", show(v)));
        return None;
    };
    let before = errs.list.len();
    check_keys(m, path, STAGE_KEYS, errs);
    let uses = match m.get("uses") {
        Some(Yaml::String(s)) => s.clone(),
        Some(other) => {
            errs.at(
                &format!("{path}.uses"),
                format!("must be a stage kind such as `ingest/synthetic`, found {}", show(other)),
            );
            String::new()
        }
        None => {
            errs.at(path, "missing `uses:` (the stage kind, e.g. `uses: ingest/synthetic`)");
            String::new()
        }
    };
    let resolve_need = |raw: &Yaml, at: String, errs: &mut Errors<'_>| -> Option<Need> {
        let Some(s) = raw.as_str() else {
            errs.at(&at, format!("must be a stage name, found {}", show(raw)));
            return None;
        };
        let stage = match vars.apply_str(s) {
            Ok(Json::String(x)) => x,
            Ok(other) => {
                errs.at(&at, format!("{s:?} resolves to {other}, not a stage name"));
                return None;
            }
            Err(e) => {
                errs.at(&at, e);
                return None;
            }
        };
        let stage = match group {
            Some((g, r, members)) if members.iter().any(|x| x == &stage) && !s.contains("${") => {
                format!("{g}.{r}.{stage}")
            }
            _ => stage,
        };
        Some(Need { stage, src: at })
    };
    let list = |raw: &Yaml, at: &str, errs: &mut Errors<'_>| -> Vec<Need> {
        match raw {
            Yaml::Sequence(items) => {
                items.iter().enumerate().filter_map(|(i, x)| resolve_need(x, format!("{at}.{i}"), errs)).collect()
            }
            other => resolve_need(other, at.to_string(), errs).into_iter().collect(),
        }
    };
    let needs_path = format!("{path}.needs");
    let needs = match m.get("needs") {
        None | Some(Yaml::Null) => Needs::List(Vec::new()),
        Some(Yaml::Mapping(slots)) => Needs::Slots(
            slots
                .iter()
                .filter_map(|(k, x)| {
                    let Some(slot) = k.as_str() else {
                        errs.at(&needs_path, format!("slot names must be strings, found {}", show(k)));
                        return None;
                    };
                    Some((slot.to_string(), list(x, &format!("{needs_path}.{slot}"), errs)))
                })
                .collect(),
        ),
        Some(other @ (Yaml::Sequence(_) | Yaml::String(_))) => Needs::List(list(other, &needs_path, errs)),
        Some(other) => {
            errs.at(
                &needs_path,
                format!("must be a list of stage names or a map of input slot → stage, found {}", show(other)),
            );
            Needs::List(Vec::new())
        }
    };
    let with = match m.get("with") {
        None | Some(Yaml::Null) => Json::Object(Default::default()),
        Some(w @ Yaml::Mapping(_)) => match to_json(w).and_then(|j| vars.apply(&j)) {
            Ok(j) => j,
            Err(e) => {
                errs.at(&format!("{path}.with"), e);
                Json::Null
            }
        },
        Some(other) => {
            errs.at(&format!("{path}.with"), format!("must be a map of settings, found {}", show(other)));
            Json::Null
        }
    };
    let seed = match m.get("seed") {
        None => vars.seed,
        Some(s) => seed_of(s, &format!("{path}.seed"), vars, errs),
    };
    let description = m.get("description").and_then(|d| d.as_str()).map(str::to_string);
    let resources = match m.get("resources") {
        None | Some(Yaml::Null) => Default::default(),
        Some(r @ Yaml::Mapping(_)) => match to_json(r)
            .and_then(|j| vars.apply(&j))
            .and_then(|j| serde_json::from_value(j).map_err(|e| e.to_string()))
        {
            Ok(r) => r,
            Err(e) => {
                errs.at(&format!("{path}.resources"), format!("{e} (expected cpus, mem, gpus, time, nodes)"));
                Default::default()
            }
        },
        Some(other) => {
            errs.at(
                &format!("{path}.resources"),
                format!("must be a map (cpus, mem, gpus, time, nodes), found {}", show(other)),
            );
            Default::default()
        }
    };
    (errs.list.len() == before).then(|| StageSpec {
        name: name.to_string(),
        uses,
        needs,
        with,
        seed,
        description,
        resources,
        src: path.to_string(),
    })
}

/// A `seed:` value: an integer, or an expression giving one (`"${round}"`: a `repeat:`
/// group of seeds).
fn seed_of(v: &Yaml, path: &str, vars: &Vars<'_>, errs: &mut Errors<'_>) -> u64 {
    match v {
        Yaml::String(x) => match vars.apply_str(x) {
            Ok(j) => j.as_u64().or_else(|| j.as_str().and_then(|t| t.trim().parse().ok())).unwrap_or_else(|| {
                errs.at(path, format!("`{x}` must give a non-negative integer, gives {j}"));
                0
            }),
            Err(e) => {
                errs.at(path, e);
                0
            }
        },
        other => other.as_u64().unwrap_or_else(|| {
            errs.at(path, format!("must be a non-negative integer, found {}", show(other)));
            0
        }),
    }
}

fn expand_group(gname: &str, v: &Yaml, path: &str, vars: &Vars<'_>, errs: &mut Errors<'_>, out: &mut Vec<StageSpec>) {
    let Some(m) = v.as_mapping() else { return };
    check_keys(m, path, GROUP_KEYS, errs);
    let repeat = match m.get("repeat").and_then(Yaml::as_u64) {
        Some(n) if (1..=1000).contains(&n) => n,
        _ => {
            errs.at(&format!("{path}.repeat"), "must be an integer from 1 to 1000 (the number of rounds)");
            return;
        }
    };
    let init: BTreeMap<String, String> = match m.get("init") {
        None => BTreeMap::new(),
        Some(Yaml::Mapping(i)) => {
            i.iter().filter_map(|(k, v)| Some((k.as_str()?.to_string(), v.as_str()?.to_string()))).collect()
        }
        Some(other) => {
            errs.at(
                &format!("{path}.init"),
                format!("must map member names to stages outside the group, found {}", show(other)),
            );
            return;
        }
    };
    let Some(members) = m.get("stages").and_then(Yaml::as_mapping) else {
        errs.at(path, "a `repeat:` group needs a `stages:` map of the stages of one round");
        return;
    };
    let names: Vec<String> = members.keys().filter_map(|k| k.as_str().map(str::to_string)).collect();
    for k in init.keys() {
        if !names.contains(k) {
            errs.at(
                &format!("{path}.init.{k}"),
                format!("`{k}` is not a stage of this group (members: {})", names.join(", ")),
            );
        }
    }
    for r in 1..=repeat {
        let prev: BTreeMap<String, String> = if r == 1 {
            init.clone()
        } else {
            names.iter().map(|n| (n.clone(), format!("{gname}.{}.{n}", r - 1))).collect()
        };
        let mut rv = Vars { params: vars.params, seed: vars.seed, name: vars.name, round: Some(r), prev: Some(&prev) };
        // The group's `seed:` (evaluated per round) is its members' default seed.
        if let Some(sv) = m.get("seed") {
            rv.seed = seed_of(sv, &format!("{path}.seed"), &rv, errs);
        }
        for (k, sv) in members {
            let Some(member) = k.as_str() else { continue };
            let mpath = format!("{path}.stages.{member}");
            if !valid_name(member) {
                if r == 1 {
                    errs.at(&mpath, format!("stage name `{member}`: use letters, digits, `-` and `_` only"));
                }
                continue;
            }
            let before = errs.list.len();
            if let Some(s) =
                parse_stage(&format!("{gname}.{r}.{member}"), sv, &mpath, &rv, Some((gname, r, &names)), errs)
            {
                out.push(s);
            }
            // Report a problem of the template once, not once per round.
            if r > 1 {
                let new: Vec<SpecError> = errs.list.drain(before..).collect();
                for e in new {
                    if !errs.list.contains(&e) {
                        errs.list.push(e);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(src: &str) -> Result<PipelineSpec, SpecErrors> {
        parse(Path::new("p.yaml"), src, &[])
    }

    #[test]
    fn a_stage_seed_can_come_from_the_round_of_a_repeat_group() {
        let src = "seed: 9\nparams: { base: 100 }\nstages:\n  seeds:\n    repeat: 3\n    stages:\n      fit: { uses: k, seed: '${round}' }\n      ev: { uses: e, needs: [fit] }\n  fixed: { uses: k, seed: '${params.base}' }\n";
        let s = p(src).expect("parses");
        let seeds: Vec<(String, u64)> = s.stages.iter().map(|x| (x.name.clone(), x.seed)).collect();
        assert_eq!(seeds[0], ("seeds.1.fit".to_string(), 1));
        assert_eq!(seeds[2], ("seeds.2.fit".to_string(), 2));
        assert_eq!(seeds[3].1, 9, "a stage without `seed:` takes the pipeline's");
        assert_eq!(seeds[6], ("fixed".to_string(), 100));
        let src = "stages:\n  seeds:\n    repeat: 3\n    stages:\n      ev: { uses: e, seed: '${round}' }\n  cmp: { uses: c, needs: [seeds.*.ev] }\n  by: { uses: c, needs: { metrics: [seeds.*.ev, seeds.last.ev] } }\n";
        let s = p(src).expect("parses");
        let names = |n: &Needs| match n {
            Needs::List(v) => v.iter().map(|x| x.stage.clone()).collect::<Vec<_>>(),
            Needs::Slots(m) => m.values().flatten().map(|x| x.stage.clone()).collect(),
        };
        assert_eq!(names(&s.stages[3].needs), ["seeds.1.ev", "seeds.2.ev", "seeds.3.ev"]);
        // a group's seed is its members' default, per round
        let g = p("seed: 4\nstages:\n  g:\n    repeat: 2\n    seed: '${round}'\n    stages:\n      a: { uses: k }\n      b: { uses: k, seed: 7 }\n")
            .expect("parses");
        assert_eq!(g.stages.iter().map(|x| x.seed).collect::<Vec<_>>(), [1, 7, 2, 7]);
        assert_eq!(names(&s.stages[4].needs), ["seeds.1.ev", "seeds.2.ev", "seeds.3.ev", "seeds.3.ev"]);
        let e = p("stages:\n  a: { uses: k, seed: 'x${params.nope}' }\n").expect_err("unknown reference");
        assert!(e.to_string().contains("a.seed"), "{e}");
        let e = p("params: { n: -1 }\nstages:\n  a: { uses: k, seed: '${params.n}' }\n").expect_err("negative");
        assert!(e.to_string().contains("non-negative integer"), "{e}");
    }

    #[test]
    fn params_keep_type_when_whole_and_format_inside_strings() {
        let s = p("seed: 5\nparams: { size: 64, model: tiny }\nstages:\n  a: { uses: k, with: { size: '${params.size}', tag: 'vit-${params.model}-${params.size}', lit: '$${x}', s: '${seed}' } }\n").expect("parses");
        let w = &s.stages[0].with;
        assert_eq!(w["size"], Json::from(64));
        assert_eq!(w["tag"], Json::from("vit-tiny-64"));
        assert_eq!(w["lit"], Json::from("${x}"));
        assert_eq!(w["s"], Json::from(5));
        assert_eq!(s.stages[0].seed, 5);
        assert_eq!(s.name, "p");
    }

    #[test]
    fn overrides_replace_params() {
        let src = "params: { size: 64 }\nstages:\n  a: { uses: k, with: { size: '${params.size}' } }\n";
        let o: Override = "params.size=32".parse().expect("valid override");
        let s = parse(Path::new("p.yaml"), src, &[o]).expect("parses");
        assert_eq!(s.stages[0].with["size"], Json::from(32));
        assert!("stages.a.uses=x".parse::<Override>().is_err());
    }

    #[test]
    fn groups_expand_with_prev_round_and_last() {
        let src = "stages:\n  data: { uses: d }\n  pre: { uses: p, needs: [data] }\n  refresh:\n    repeat: 3\n    init: { pre: pre }\n    stages:\n      attn: { uses: a, needs: ['${prev.pre}', data] }\n      pre: { uses: p, needs: [data, attn], with: { r: '${round}' } }\n  ft: { uses: f, needs: [refresh.last.pre] }\n";
        let s = p(src).expect("parses");
        let names: Vec<&str> = s.stages.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "data",
                "pre",
                "refresh.1.attn",
                "refresh.1.pre",
                "refresh.2.attn",
                "refresh.2.pre",
                "refresh.3.attn",
                "refresh.3.pre",
                "ft"
            ]
        );
        let need = |n: &str| s.stage(n).expect("stage").needs.all().iter().map(|x| x.stage.clone()).collect::<Vec<_>>();
        assert_eq!(need("refresh.1.attn"), ["pre", "data"]);
        assert_eq!(need("refresh.2.attn"), ["refresh.1.pre", "data"]);
        assert_eq!(need("refresh.3.pre"), ["data", "refresh.3.attn"]);
        assert_eq!(need("ft"), ["refresh.3.pre"]);
        assert_eq!(s.stage("refresh.2.pre").expect("stage").with["r"], Json::from(2));
    }

    #[test]
    fn every_error_class_names_file_line_and_key() {
        let cases: &[(&str, &str, &str)] = &[
            ("stages:\n  a: { uses: k\n", "p.yaml:", "invalid YAML"),
            ("stagez: {}\n", "p.yaml:1:", "unknown key `stagez` (did you mean `stages`?)"),
            ("stages:\n  a: { usse: k }\n", "p.yaml:2:", "stages.a.usse: unknown key `usse` (did you mean `uses`?)"),
            ("stages:\n  a: { needs: [] }\n", "p.yaml:2:", "stages.a: missing `uses:`"),
            ("seed: -3\nstages:\n  a: { uses: k }\n", "p.yaml:1:", "seed: must be a non-negative integer"),
            ("stages:\n  a:\n    uses: k\n    with: { x: '${params.nope}' }\n", "p.yaml:4:", "no parameter `nope`"),
            ("stages:\n  a.b: { uses: k }\n", "p.yaml:2:", "use letters, digits"),
            (
                "stages:\n  g:\n    repeat: 2\n    stages:\n      x: { uses: k, needs: ['${prev.x}'] }\n",
                "p.yaml:5:",
                "round 1 has no previous `x`",
            ),
            ("stages: []\n", "p.yaml:1:", "stages: must be a map"),
            (
                "stages:\n  a: { uses: k, resources: { gpu: 1 } }\n",
                "p.yaml:2:",
                "stages.a.resources: unknown field `gpu`",
            ),
            ("", "p.yaml", "the file is empty"),
        ];
        for (src, loc, msg) in cases {
            let e = p(src).err().unwrap_or_else(|| panic!("{src:?} must fail"));
            let text = e.to_string();
            assert!(text.starts_with(loc), "{src:?}: {text}");
            assert!(text.contains(msg), "{src:?}: {text}");
        }
    }

    #[test]
    fn group_template_errors_are_reported_once() {
        let e = p("stages:\n  g:\n    repeat: 3\n    stages:\n      x: { uses: k, wiht: {} }\n").expect_err("fails");
        assert_eq!(e.0.len(), 1, "{e}");
    }
}
