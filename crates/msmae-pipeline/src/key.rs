//! Cache keys. A stage's key is the BLAKE3 digest of the canonical JSON of its
//! [`KeyParts`]: kind, version, code fingerprint (the normalised sources of the crates the
//! stage computes with), the versions of the numeric crates on that path, full config
//! (defaults filled, key order irrelevant), seed, the content digests of its inputs, and —
//! for stages whose numbers depend on it — the backend, its library (libtorch's version),
//! device kind and precision. Names of upstream stages and
//! paths of external inputs are recorded for people but not hashed: renaming a stage or
//! moving a checkout does not invalidate the cache.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value as Json;

/// An upstream artifact bound to an input slot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InputRef {
    pub stage: String,
    pub digest: String,
}

/// Content of a file or folder outside the store that a stage reads.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExternalRef {
    pub path: String,
    pub digest: String,
    pub files: u64,
    pub bytes: u64,
}

/// What numbers depend on, for stages that use the ML backend.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnvKey {
    pub backend: String,
    /// The numeric library behind the backend (`libtorch 2.9.0`); empty for pure Rust.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub library: String,
    pub device_kind: String,
    pub precision: String,
}

/// The version of the key scheme: keys of another scheme never match (their stages
/// recompute once, and the runner says why).
pub const KEY_SCHEME: u32 = 2;

/// A stage's code fingerprint as its build script exported it (`msmae-fingerprint`):
/// `v2;<digest>;<crate>=<digest>,…;<dep>=<version>,…`, or a bare name when the stage's
/// crate has no build script (test stages).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Code {
    pub digest: String,
    pub crates: BTreeMap<String, String>,
    pub deps: BTreeMap<String, String>,
}

impl Code {
    pub fn parse(s: &str) -> Self {
        let pairs = |t: &str| -> BTreeMap<String, String> {
            t.split(',').filter_map(|kv| kv.split_once('=')).map(|(k, v)| (k.to_string(), v.to_string())).collect()
        };
        match s.strip_prefix("v2;").map(|r| r.splitn(3, ';').collect::<Vec<_>>()) {
            Some(p) if p.len() == 3 => Code { digest: p[0].to_string(), crates: pairs(p[1]), deps: pairs(p[2]) },
            _ => Code { digest: s.to_string(), ..Code::default() },
        }
    }

    /// Whether this is a real build-time fingerprint (not a crate's name and version).
    pub fn is_built(&self) -> bool {
        !self.crates.is_empty() && self.digest.len() == 32 && self.digest.bytes().all(|b| b.is_ascii_hexdigit())
    }
}

/// Everything a stage's output is a function of.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KeyParts {
    /// [`KEY_SCHEME`]; absent (0) in records of an older msmae.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub scheme: u32,
    pub kind: String,
    pub version: u32,
    pub code: String,
    /// Per crate the stage computes with, the digest of its normalised sources (recorded so
    /// that `msmae why` can name the crate that changed; `code` covers them).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub crates: BTreeMap<String, String>,
    /// Numeric external crates on the stage's path → version (hashed into the key).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub deps: BTreeMap<String, String>,
    pub seed: u64,
    pub config: Json,
    pub inputs: BTreeMap<String, Vec<InputRef>>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub external: Vec<ExternalRef>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env: Option<EnvKey>,
}

impl KeyParts {
    /// The cache key (64 hex digits).
    pub fn key(&self) -> String {
        let hashed = serde_json::json!({
            "scheme": self.scheme,
            "deps": self.deps,
            "kind": self.kind,
            "version": self.version,
            "code": self.code,
            "seed": self.seed,
            "config": self.config,
            "inputs": self.inputs.iter().map(|(k, v)| (k.clone(), v.iter().map(|i| i.digest.clone()).collect::<Vec<_>>())).collect::<BTreeMap<_, _>>(),
            "external": self.external.iter().map(|e| e.digest.clone()).collect::<Vec<_>>(),
            "env": self.env,
        });
        let mut h = blake3::Hasher::new_derive_key("msmae stage key v2");
        h.update(canonical_json(&hashed).as_bytes());
        h.finalize().to_hex().to_string()
    }

    /// Human-readable differences from `old` (empty when the keys are equal).
    pub fn diff(&self, old: &KeyParts) -> Vec<String> {
        let mut out = Vec::new();
        if self.kind != old.kind {
            out.push(format!("kind {} → {}", old.kind, self.kind));
        }
        if self.version != old.version {
            out.push(format!("stage version {} → {}", old.version, self.version));
        }
        if self.scheme != old.scheme {
            out.push(format!(
                "the cache-key scheme changed ({} → {}): recorded by an older msmae, computed once again (see CHANGELOG.md)",
                old.scheme, self.scheme
            ));
        } else if self.code != old.code {
            let changed: Vec<String> = self
                .crates
                .iter()
                .filter(|(k, v)| old.crates.get(*k) != Some(v))
                .map(
                    |(k, _)| {
                        if old.crates.contains_key(k) { format!("`{k}`") } else { format!("`{k}` (new on its path)") }
                    },
                )
                .chain(
                    old.crates
                        .keys()
                        .filter(|k| !self.crates.contains_key(*k))
                        .map(|k| format!("`{k}` (no longer on its path)")),
                )
                .collect();
            if changed.is_empty() {
                out.push(format!("code changed (fingerprint {} → {})", short(&old.code), short(&self.code)));
            } else {
                out.push(format!("code of {} changed", changed.join(", ")));
            }
        }
        if self.scheme == old.scheme && self.deps != old.deps {
            let names: std::collections::BTreeSet<&String> = self.deps.keys().chain(old.deps.keys()).collect();
            for n in names {
                match (old.deps.get(n), self.deps.get(n)) {
                    (Some(a), Some(b)) if a != b => out.push(format!("dependency {n} {a} → {b}")),
                    (None, Some(b)) => out.push(format!("dependency {n} {b} added")),
                    (Some(a), None) => out.push(format!("dependency {n} {a} removed")),
                    _ => {}
                }
            }
        }
        if self.seed != old.seed {
            out.push(format!("seed {} → {}", old.seed, self.seed));
        }
        diff_json("config", &old.config, &self.config, &mut out);
        let slots: std::collections::BTreeSet<&String> = self.inputs.keys().chain(old.inputs.keys()).collect();
        for slot in slots {
            let (a, b) = (old.inputs.get(slot), self.inputs.get(slot));
            let da: Vec<&str> = a.map(|v| v.iter().map(|i| i.digest.as_str()).collect()).unwrap_or_default();
            let db: Vec<&str> = b.map(|v| v.iter().map(|i| i.digest.as_str()).collect()).unwrap_or_default();
            if da != db {
                let names = |v: Option<&Vec<InputRef>>| {
                    v.map(|v| {
                        v.iter().map(|i| format!("{}@{}", i.stage, short(&i.digest))).collect::<Vec<_>>().join(", ")
                    })
                    .unwrap_or_else(|| "nothing".into())
                };
                out.push(format!("input `{slot}` changed: {} → {}", names(a), names(b)));
            }
        }
        let ea: Vec<&str> = old.external.iter().map(|e| e.digest.as_str()).collect();
        let eb: Vec<&str> = self.external.iter().map(|e| e.digest.as_str()).collect();
        if ea != eb {
            for e in &self.external {
                match old.external.iter().find(|o| o.path == e.path) {
                    Some(o) if o.digest == e.digest => {}
                    Some(o) => out.push(format!(
                        "external `{}` changed: {} files/{} bytes → {} files/{} bytes",
                        e.path, o.files, o.bytes, e.files, e.bytes
                    )),
                    None => out.push(format!("external `{}` added", e.path)),
                }
            }
            for o in &old.external {
                if !self.external.iter().any(|e| e.path == o.path) {
                    out.push(format!("external `{}` removed", o.path));
                }
            }
        }
        if let (Some(a), Some(b)) = (&old.env, &self.env)
            && a.library != b.library
        {
            let show = |l: &str| if l.is_empty() { "none".to_string() } else { l.to_string() };
            out.push(format!("numeric library {} → {}", show(&a.library), show(&b.library)));
        }
        let without_library = |e: &Option<EnvKey>| e.as_ref().map(|e| EnvKey { library: String::new(), ..e.clone() });
        if without_library(&self.env) != without_library(&old.env) {
            let show = |e: &Option<EnvKey>| {
                e.as_ref()
                    .map(|e| format!("{}/{}/{}", e.backend, e.device_kind, e.precision))
                    .unwrap_or_else(|| "-".into())
            };
            out.push(format!("environment {} → {}", show(&old.env), show(&self.env)));
        }
        if out.is_empty() && self.key() != old.key() {
            out.push("key changed".into());
        }
        out
    }
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

fn short(s: &str) -> &str {
    &s[..s.len().min(12)]
}

fn diff_json(path: &str, a: &Json, b: &Json, out: &mut Vec<String>) {
    match (a, b) {
        (Json::Object(x), Json::Object(y)) => {
            let keys: std::collections::BTreeSet<&String> = x.keys().chain(y.keys()).collect();
            for k in keys {
                let p = format!("{path}.{k}");
                match (x.get(k), y.get(k)) {
                    (Some(va), Some(vb)) => diff_json(&p, va, vb, out),
                    (None, Some(vb)) => out.push(format!("{p}: (unset) → {}", canonical_json(vb))),
                    (Some(va), None) => out.push(format!("{p}: {} → (unset)", canonical_json(va))),
                    (None, None) => {}
                }
            }
        }
        _ if a != b => out.push(format!("{path}: {} → {}", canonical_json(a), canonical_json(b))),
        _ => {}
    }
}

/// JSON with object keys sorted at every level and no whitespace: equal data, equal text.
pub fn canonical_json(v: &Json) -> String {
    fn sorted(v: &Json) -> Json {
        match v {
            Json::Object(o) => {
                let mut entries: Vec<(&String, &Json)> = o.iter().collect();
                entries.sort_by(|a, b| a.0.cmp(b.0));
                Json::Object(entries.into_iter().map(|(k, v)| (k.clone(), sorted(v))).collect())
            }
            Json::Array(a) => Json::Array(a.iter().map(sorted).collect()),
            other => other.clone(),
        }
    }
    sorted(v).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn parts(config: Json) -> KeyParts {
        KeyParts {
            scheme: KEY_SCHEME,
            kind: "k/x".into(),
            version: 1,
            code: "abc".into(),
            crates: BTreeMap::from([("msmae-a".into(), "1".into()), ("msmae-b".into(), "2".into())]),
            deps: BTreeMap::from([("image".into(), "0.25.5".into())]),
            seed: 1,
            config,
            inputs: BTreeMap::from([("data".into(), vec![InputRef { stage: "data".into(), digest: "d1".into() }])]),
            external: vec![],
            env: None,
        }
    }

    #[test]
    fn upstream_names_do_not_change_the_key_but_digests_do() {
        let a = parts(serde_json::json!({"x": 1}));
        let mut b = a.clone();
        b.inputs.get_mut("data").expect("slot")[0].stage = "renamed".into();
        assert_eq!(a.key(), b.key());
        b.inputs.get_mut("data").expect("slot")[0].digest = "d2".into();
        assert_ne!(a.key(), b.key());
        assert_eq!(b.diff(&a), ["input `data` changed: data@d1 → renamed@d2"]);
    }

    #[test]
    fn why_names_the_crate_the_dependency_the_library_and_the_scheme() {
        let a = parts(serde_json::json!({}));
        let mut b = a.clone();
        b.code = "abd".into();
        b.crates.insert("msmae-b".into(), "3".into());
        b.deps.insert("image".into(), "0.25.6".into());
        assert_ne!(a.key(), b.key());
        assert_eq!(b.diff(&a), ["code of `msmae-b` changed", "dependency image 0.25.5 → 0.25.6"]);
        let env = |l: &str| {
            Some(EnvKey {
                backend: "tch".into(),
                library: l.into(),
                device_kind: "cpu".into(),
                precision: "f32".into(),
            })
        };
        let (mut c, mut d) = (a.clone(), a.clone());
        c.env = env("libtorch 2.9.0");
        d.env = env("libtorch 2.11.0");
        assert_ne!(c.key(), d.key());
        assert_eq!(d.diff(&c), ["numeric library libtorch 2.9.0 → libtorch 2.11.0"]);
        let mut old = a.clone();
        old.scheme = 0;
        assert!(a.diff(&old)[0].contains("cache-key scheme changed"), "{:?}", a.diff(&old));
        // The fingerprint's exported form round-trips; a bare name is not a built one.
        let code = Code::parse("v2;0123456789abcdef0123456789abcdef;msmae-a=11,msmae-b=22;image=0.25.6,png=0.17.16");
        assert!(code.is_built());
        assert_eq!(code.crates.len(), 2);
        assert_eq!(code.deps["png"], "0.17.16");
        assert!(!Code::parse("msmae-x@0.1.0").is_built());
    }

    #[test]
    fn diff_names_config_paths() {
        let a = parts(serde_json::json!({"opt": {"lr": 0.1, "wd": 0.05}, "epochs": 3}));
        let b = parts(serde_json::json!({"opt": {"lr": 0.2, "wd": 0.05}}));
        assert_eq!(b.diff(&a), ["config.epochs: 3 → (unset)", "config.opt.lr: 0.1 → 0.2"]);
    }

    fn arb_json() -> impl Strategy<Value = Json> {
        let leaf = prop_oneof![
            any::<i64>().prop_map(Json::from),
            any::<bool>().prop_map(Json::from),
            "[a-z]{0,4}".prop_map(Json::from)
        ];
        leaf.prop_recursive(3, 24, 4, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(Json::Array),
                prop::collection::btree_map("[a-z]{1,3}", inner, 0..4)
                    .prop_map(|m| Json::Object(m.into_iter().collect())),
            ]
        })
    }

    fn reverse_keys(v: &Json) -> Json {
        match v {
            Json::Object(o) => Json::Object(o.iter().rev().map(|(k, v)| (k.clone(), reverse_keys(v))).collect()),
            Json::Array(a) => Json::Array(a.iter().map(reverse_keys).collect()),
            other => other.clone(),
        }
    }

    proptest! {
        #[test]
        fn key_order_never_changes_the_key(cfg in arb_json()) {
            let a = parts(cfg.clone());
            let b = parts(reverse_keys(&cfg));
            prop_assert_eq!(a.key(), b.key());
            prop_assert!(b.diff(&a).is_empty());
        }
    }
}
