//! From a parsed pipeline to a validated DAG: every `uses` names a registered kind, every
//! `with` fits the kind's typed config, every `needs` names a stage and binds to an input
//! slot of a matching artifact kind, and there is no cycle. All problems are reported at
//! once, with file, line and key, before any stage runs.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;

use msmae_core::{Arity, DynStage, InputSlot, OutputDecl, PreparedStage, Registry, Resources};

use crate::error::{SpecError, SpecErrors};
use crate::spec::{Need, Needs, PipelineSpec, StageSpec};

/// One stage of the validated DAG.
#[derive(Clone)]
pub struct Node {
    pub name: String,
    pub kind: Arc<dyn DynStage>,
    pub prepared: Arc<dyn PreparedStage>,
    /// The config as the cache key sees it ([`PreparedStage::key_json`]).
    pub config: serde_json::Value,
    pub seed: u64,
    pub output: OutputDecl,
    pub slots: Vec<InputSlot>,
    /// Slot → indices of upstream nodes.
    pub bindings: BTreeMap<String, Vec<usize>>,
    /// Upstream nodes (deduplicated, sorted).
    pub deps: Vec<usize>,
    pub external: Vec<PathBuf>,
    pub resources: Resources,
    pub description: Option<String>,
    /// What a Slurm job of this stage asks for (the pipeline's `resources:`).
    pub cluster: crate::slurm::StageResources,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("name", &self.name)
            .field("kind", &self.kind.kind())
            .field("deps", &self.deps)
            .finish_non_exhaustive()
    }
}

/// A validated pipeline: nodes in a topological order (file order where free).
#[derive(Debug, Clone)]
pub struct Plan {
    pub spec: PipelineSpec,
    pub nodes: Vec<Node>,
}

impl Plan {
    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.nodes.iter().position(|n| n.name == name)
    }

    /// Direct dependents of each node.
    pub fn dependents(&self) -> Vec<Vec<usize>> {
        let mut out = vec![Vec::new(); self.nodes.len()];
        for (i, n) in self.nodes.iter().enumerate() {
            for &d in &n.deps {
                out[d].push(i);
            }
        }
        out
    }

    /// `start` and everything downstream of it.
    pub fn downstream(&self, start: usize) -> BTreeSet<usize> {
        let deps = self.dependents();
        let mut seen = BTreeSet::from([start]);
        let mut stack = vec![start];
        while let Some(i) = stack.pop() {
            for &j in &deps[i] {
                if seen.insert(j) {
                    stack.push(j);
                }
            }
        }
        seen
    }

    /// `start` and everything upstream of it.
    pub fn upstream(&self, start: usize) -> BTreeSet<usize> {
        let mut seen = BTreeSet::from([start]);
        let mut stack = vec![start];
        while let Some(i) = stack.pop() {
            for &j in &self.nodes[i].deps {
                if seen.insert(j) {
                    stack.push(j);
                }
            }
        }
        seen
    }
}

/// A stage kind and its prepared config, per stage of the spec (`None`: an error was
/// reported for it).
type Prepared = Vec<Option<(Arc<dyn DynStage>, Arc<dyn PreparedStage>)>>;

/// Validate `spec` against the registered stage kinds. Every error is collected (kinds and
/// configs, needs, inputs, external data, cycles), so the user sees them all at once.
pub fn plan(spec: PipelineSpec, registry: &Registry) -> Result<Plan, SpecErrors> {
    let mut errs: Vec<SpecError> = Vec::new();
    let prepared = prepare_kinds(&spec, registry, &mut errs);
    let bindings = bind_needs(&spec, &prepared, &mut errs);
    check_external_inputs(&spec, &prepared, &mut errs);
    let deps: Vec<Vec<usize>> =
        bindings.iter().map(|b| b.values().flatten().copied().collect::<BTreeSet<_>>().into_iter().collect()).collect();
    let order = match topo_order(&deps) {
        Ok(o) => o,
        Err(cycle) => {
            let path: Vec<&str> = cycle.iter().map(|&i| spec.stages[i].name.as_str()).collect();
            let first = &spec.stages[cycle[0]];
            errs.push(spec.error(&format!("{}.needs", first.src), format!("dependency cycle: {}", path.join(" → "))));
            Vec::new()
        }
    };
    if !errs.is_empty() {
        errs.dedup();
        return Err(SpecErrors(errs));
    }
    let nodes = build_nodes(&spec, &prepared, &bindings, &deps, &order);
    Ok(Plan { spec, nodes })
}

/// Step 1: each stage's kind, and its `with:` block checked against the kind's typed config.
fn prepare_kinds(spec: &PipelineSpec, registry: &Registry, errs: &mut Vec<SpecError>) -> Prepared {
    let mut prepared: Prepared = Vec::new();
    for s in &spec.stages {
        let Some(kind) = registry.get(&s.uses) else {
            let hint = match registry.suggest(&s.uses).as_slice() {
                [] => String::new(),
                near => format!(
                    " (did you mean {}?)",
                    near.iter().map(|k| format!("`{k}`")).collect::<Vec<_>>().join(" or ")
                ),
            };
            errs.push(spec.error(
                &format!("{}.uses", s.src),
                format!("unknown stage kind `{}`{hint}; `msmae stages` lists the kinds", s.uses),
            ));
            prepared.push(None);
            continue;
        };
        match kind.prepare(&s.with) {
            Ok(p) => prepared.push(Some((kind.clone(), p))),
            Err(e) => {
                let key =
                    if e.path.is_empty() { format!("{}.with", s.src) } else { format!("{}.with.{}", s.src, e.path) };
                errs.push(spec.error(&key, format!("{} (stage `{}`, kind `{}`)", e.message, s.name, s.uses)));
                prepared.push(None);
            }
        }
    }
    prepared
}

/// The index of stage `stage` named in `needs` of `s` (at `src`), or an error.
fn resolve(
    spec: &PipelineSpec,
    names: &BTreeMap<&str, usize>,
    s: &StageSpec,
    stage: &str,
    src: &str,
    errs: &mut Vec<SpecError>,
) -> Option<usize> {
    if stage == s.name {
        errs.push(spec.error(src, format!("stage `{}` cannot need itself", s.name)));
        return None;
    }
    match names.get(stage) {
        Some(&j) => Some(j),
        None => {
            let near: Vec<&str> = names
                .keys()
                .copied()
                .filter(|n| msmae_core::stage::edit_distance(n, stage) <= 1.max(stage.len() / 3))
                .collect();
            let hint = near.first().map(|n| format!(" (did you mean `{n}`?)")).unwrap_or_default();
            errs.push(spec.error(src, format!("`{stage}` is not a stage of this pipeline{hint}")));
            None
        }
    }
}

/// Step 2: `needs` → input slots, per stage: by slot name (a map) or by artifact kind (a list),
/// then each slot's arity.
fn bind_needs(
    spec: &PipelineSpec,
    prepared: &Prepared,
    errs: &mut Vec<SpecError>,
) -> Vec<BTreeMap<String, Vec<usize>>> {
    let names: BTreeMap<&str, usize> = spec.stages.iter().enumerate().map(|(i, s)| (s.name.as_str(), i)).collect();
    let mut bindings: Vec<BTreeMap<String, Vec<usize>>> = vec![BTreeMap::new(); spec.stages.len()];
    for (i, s) in spec.stages.iter().enumerate() {
        let Some((_, p)) = &prepared[i] else {
            // Still check that the names exist.
            for n in s.needs.all() {
                resolve(spec, &names, s, &n.stage, &n.src, errs);
            }
            continue;
        };
        let slots = p.inputs();
        let errors_before = errs.len();
        let b = &mut bindings[i];
        match &s.needs {
            Needs::Slots(m) => bind_named(spec, &names, s, m, &slots, prepared, b, errs),
            Needs::List(ns) => bind_listed(spec, &names, s, ns, &slots, prepared, b, errs),
        }
        if errs.len() == errors_before {
            // (arity complaints would only repeat the needs errors above)
            check_arity(spec, s, &slots, b, errs);
        }
    }
    bindings
}

fn slot_list(slots: &[InputSlot]) -> String {
    slots
        .iter()
        .map(|sl| format!("{} ({})", sl.name, sl.kinds.iter().map(|k| k.0.as_str()).collect::<Vec<_>>().join("|")))
        .collect::<Vec<_>>()
        .join(", ")
}

/// `needs: { slot: stage | [stages] }`.
#[allow(clippy::too_many_arguments)]
fn bind_named(
    spec: &PipelineSpec,
    names: &BTreeMap<&str, usize>,
    s: &StageSpec,
    m: &BTreeMap<String, Vec<Need>>,
    slots: &[InputSlot],
    prepared: &Prepared,
    b: &mut BTreeMap<String, Vec<usize>>,
    errs: &mut Vec<SpecError>,
) {
    for (slot, ns) in m {
        let Some(sl) = slots.iter().find(|x| &x.name == slot) else {
            errs.push(spec.error(
                &format!("{}.needs.{slot}", s.src),
                format!("kind `{}` has no input slot `{slot}`; its slots: {}", s.uses, slot_list(slots)),
            ));
            continue;
        };
        for n in ns {
            let Some(j) = resolve(spec, names, s, &n.stage, &n.src, errs) else { continue };
            if let Some((_, up)) = &prepared[j] {
                let k = up.output().kind;
                if !sl.accepts(&k) {
                    errs.push(spec.error(
                        &n.src,
                        format!(
                            "`{}` produces `{k}`, but slot `{slot}` takes {}",
                            n.stage,
                            sl.kinds.iter().map(|k| format!("`{k}`")).collect::<Vec<_>>().join(" or ")
                        ),
                    ));
                    continue;
                }
            }
            b.entry(slot.clone()).or_default().push(j);
        }
    }
}

/// `needs: [stages]`: each artifact goes to the slot that takes its kind.
#[allow(clippy::too_many_arguments)]
fn bind_listed(
    spec: &PipelineSpec,
    names: &BTreeMap<&str, usize>,
    s: &StageSpec,
    ns: &[Need],
    slots: &[InputSlot],
    prepared: &Prepared,
    b: &mut BTreeMap<String, Vec<usize>>,
    errs: &mut Vec<SpecError>,
) {
    for n in ns {
        let Some(j) = resolve(spec, names, s, &n.stage, &n.src, errs) else { continue };
        let Some((_, up)) = &prepared[j] else { continue };
        let k = up.output().kind;
        let fits: Vec<&InputSlot> = slots.iter().filter(|sl| sl.accepts(&k)).collect();
        match fits.as_slice() {
            [] => errs.push(spec.error(
                &n.src,
                format!(
                    "`{}` produces `{k}`, which no input of kind `{}` takes; its slots: {}",
                    n.stage,
                    s.uses,
                    if slots.is_empty() { "none".into() } else { slot_list(slots) }
                ),
            )),
            [one] => b.entry(one.name.clone()).or_default().push(j),
            many => {
                // Fill single slots in declaration order; ambiguous only if more
                // artifacts of the kind are listed than there are slots for it.
                let free = many.iter().find(|sl| sl.arity == Arity::Many || !b.contains_key(&sl.name));
                match free {
                    Some(sl) => b.entry(sl.name.clone()).or_default().push(j),
                    None => errs.push(spec.error(
                        &n.src,
                        format!(
                            "`{}` ({k}) fits several slots ({}); name them: `needs: {{ slot: stage }}`",
                            n.stage,
                            many.iter().map(|s| s.name.as_str()).collect::<Vec<_>>().join(", ")
                        ),
                    )),
                }
            }
        }
    }
}

/// Every slot got as many artifacts as its arity allows.
fn check_arity(
    spec: &PipelineSpec,
    s: &StageSpec,
    slots: &[InputSlot],
    b: &BTreeMap<String, Vec<usize>>,
    errs: &mut Vec<SpecError>,
) {
    let needs_key = format!("{}.needs", s.src);
    for sl in slots {
        let got = b.get(&sl.name).map(Vec::len).unwrap_or(0);
        let want = match sl.arity {
            Arity::One if got != 1 => "exactly one",
            Arity::Optional if got > 1 => "at most one",
            Arity::Many if got == 0 => "at least one",
            _ => continue,
        };
        errs.push(spec.error(
            if s.needs.all().is_empty() { &s.src } else { &needs_key },
            format!(
                "input `{}` of kind `{}` takes {want} `{}` artifact ({}), got {got}",
                sl.name,
                s.uses,
                sl.kinds.iter().map(|k| k.0.as_str()).collect::<Vec<_>>().join("|"),
                sl.doc
            ),
        ));
    }
}

/// Step 3: external inputs (dataset folders) must exist before anything runs; then the files
/// they list (a manifest's images) must be readable from them (the key reads the list
/// again when it is computed: exec::key_parts).
fn check_external_inputs(spec: &PipelineSpec, prepared: &Prepared, errs: &mut Vec<SpecError>) {
    for (i, s) in spec.stages.iter().enumerate() {
        let Some((_, p)) = &prepared[i] else { continue };
        let mut all_there = true;
        for path in p.external_inputs(&spec.base_dir) {
            if !path.exists() {
                all_there = false;
                errs.push(spec.error(
                    &format!("{}.with", s.src),
                    format!(
                        "stage `{}` reads `{}`, which does not exist; data/README.md says where each dataset comes from and how to lay it out",
                        s.name,
                        path.display()
                    ),
                ));
            }
        }
        if all_there && let Err(e) = p.listed_inputs(&spec.base_dir) {
            errs.push(spec.error(&format!("{}.with", s.src), format!("stage `{}`: {e}", s.name)));
        }
    }
}

/// The plan's nodes in execution order (`order`), indices renumbered to positions in it.
fn build_nodes(
    spec: &PipelineSpec,
    prepared: &Prepared,
    bindings: &[BTreeMap<String, Vec<usize>>],
    deps: &[Vec<usize>],
    order: &[usize],
) -> Vec<Node> {
    let mut pos = vec![0; order.len()];
    for (p, &i) in order.iter().enumerate() {
        pos[i] = p;
    }
    order
        .iter()
        .filter_map(|&i| {
            let s = &spec.stages[i];
            // Every stage was prepared: `plan` returns its errors before building nodes.
            let (kind, p) = prepared[i].clone()?;
            let b: BTreeMap<String, Vec<usize>> =
                bindings[i].iter().map(|(k, v)| (k.clone(), v.iter().map(|&j| pos[j]).collect())).collect();
            Some(Node {
                name: s.name.clone(),
                config: p.key_json(),
                seed: s.seed,
                output: p.output(),
                slots: p.inputs(),
                deps: deps[i].iter().map(|&j| pos[j]).collect::<BTreeSet<_>>().into_iter().collect(),
                bindings: b,
                external: p.external_inputs(&spec.base_dir),
                resources: p.resources(),
                description: s.description.clone(),
                cluster: s.resources.clone(),
                kind,
                prepared: p,
            })
        })
        .collect()
}

/// Kahn's algorithm, taking the lowest-numbered ready node first (stable file order).
/// On a cycle, returns one cycle as a path that starts and ends at the same node.
fn topo_order(deps: &[Vec<usize>]) -> Result<Vec<usize>, Vec<usize>> {
    let n = deps.len();
    let mut indeg: Vec<usize> = deps.iter().map(Vec::len).collect();
    let mut users = vec![Vec::new(); n];
    for (i, d) in deps.iter().enumerate() {
        for &j in d {
            users[j].push(i);
        }
    }
    let mut ready: BTreeSet<usize> = (0..n).filter(|&i| indeg[i] == 0).collect();
    let mut order = Vec::with_capacity(n);
    while let Some(i) = ready.pop_first() {
        order.push(i);
        for &u in &users[i] {
            indeg[u] -= 1;
            if indeg[u] == 0 {
                ready.insert(u);
            }
        }
    }
    if order.len() == n {
        return Ok(order);
    }
    // Walk dependencies among the unresolved nodes until one repeats.
    let start = (0..n).find(|&i| indeg[i] > 0).unwrap_or(0);
    let mut path = vec![start];
    let mut cur = start;
    loop {
        let Some(&next) = deps[cur].iter().find(|&&j| indeg[j] > 0) else { return Err(path) };
        if let Some(p) = path.iter().position(|&x| x == next) {
            let mut cycle = path[p..].to_vec();
            cycle.push(next);
            cycle.reverse(); // upstream → downstream reads naturally
            return Err(cycle);
        }
        path.push(next);
        cur = next;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topo_keeps_file_order_and_finds_cycles() {
        assert_eq!(topo_order(&[vec![], vec![0], vec![0]]), Ok(vec![0, 1, 2]));
        assert_eq!(topo_order(&[vec![1], vec![], vec![0]]), Ok(vec![1, 0, 2]));
        let cycle = topo_order(&[vec![], vec![2], vec![1]]).expect_err("cycle");
        assert_eq!(cycle.first(), cycle.last());
        assert_eq!(cycle.len(), 3);
    }
}
