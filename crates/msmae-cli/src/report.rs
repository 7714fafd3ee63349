//! `msmae report`: one self-contained HTML page of a pipeline's results as its lock file
//! records them — no network, no scripts from elsewhere, every figure embedded — that
//! opens from a file in any browser and can be mailed or archived beside the lock file.
//!
//! Sections (each an element id, which the browser test checks): `summary` (the declared
//! tables, e.g. `eval/compare`, and each stage's headline numbers), `dag` (the stage graph
//! as SVG, coloured by state), `stages` (state, parameters, timing), `figures` (every
//! declared figure: ROC and confusion charts, attention overlays with lesion outlines, MAE
//! reconstructions, loss and accuracy curves, segmentation predictions) and `provenance`
//! (code fingerprints, input digests, seed, backend, host and tool versions per stage).

use std::collections::BTreeMap;
use std::fmt::Write as _;

use base64::Engine as _;
use msmae_pipeline::inspect::StatusRow;
use msmae_pipeline::results::{self, StageResults};
use msmae_pipeline::{LockFile, Plan, Store};

/// Figures per declared pattern (`overlays/*.png` may match many).
const MAX_FIGURES: usize = 8;

/// Everything the page is made of.
#[derive(Debug)]
pub struct Inputs<'a> {
    pub plan: &'a Plan,
    pub store: &'a Store,
    pub lock: &'a LockFile,
    pub lock_label: String,
    pub status: &'a [StatusRow],
    /// Results of every stage (not only those declaring any).
    pub results: &'a [StageResults],
    pub generated: String,
    pub version: &'a str,
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// The whole page.
pub fn html(x: &Inputs<'_>) -> String {
    let spec = &x.plan.spec;
    let mut o = String::with_capacity(1 << 20);
    let title = format!("msmae report: {}", spec.name);
    let _ = write!(
        o,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{}</title>\n<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n<meta name=\"generator\" content=\"msmae report\">\n",
        esc(&title)
    );
    // First script: collect errors of everything after it (the browser test reads them).
    o.push_str("<script>window.__errors=[];window.addEventListener('error',function(e){window.__errors.push(String(e.message||(e.target&&e.target.src)||e))},true);</script>\n");
    o.push_str(STYLE);
    o.push_str("</head><body>\n");
    let _ = write!(o, "<header><h1>{}</h1>", esc(&title));
    if let Some(d) = &spec.description {
        let _ = write!(o, "<p class=\"desc\">{}</p>", esc(d));
    }
    let _ = writeln!(
        o,
        "<p class=\"meta\">pipeline <code>{}</code> · lock file <code>{}</code> · store <code>{}</code> · seed {} · generated {} by msmae {}</p></header>",
        esc(&spec.file.display().to_string()),
        esc(&x.lock_label),
        esc(&x.store.root().display().to_string()),
        spec.seed,
        esc(&x.generated),
        esc(x.version)
    );
    nav(&mut o);
    summary(&mut o, x);
    dag(&mut o, x);
    stages(&mut o, x);
    figures(&mut o, x);
    provenance(&mut o, x);
    // Last script: the page's own check, written into the DOM for a headless browser.
    o.push_str(
        "<script>window.addEventListener('load',function(){var bad=0;var im=document.images;for(var i=0;i<im.length;i++){if(!im[i].complete||im[i].naturalWidth===0){bad++;}}\
document.body.setAttribute('data-images',String(im.length));document.body.setAttribute('data-broken-images',String(bad));\
document.body.setAttribute('data-errors',String(window.__errors.length));document.body.setAttribute('data-error-text',window.__errors.join(' | '));\
document.body.setAttribute('data-ready','1');});</script>\n",
    );
    o.push_str("</body></html>\n");
    o
}

const STYLE: &str = "<style>
body{font-family:system-ui,-apple-system,'DejaVu Sans',sans-serif;margin:0 auto;max-width:1200px;padding:0 24px 48px;color:#1d2327;background:#fff}
header{border-bottom:2px solid #2c6e9b;margin-bottom:8px}h1{margin:18px 0 4px;font-size:26px}h2{margin-top:34px;border-bottom:1px solid #ccd;padding-bottom:4px}
h3{margin:22px 0 6px;font-size:17px}.desc{margin:2px 0;font-size:15px}.meta{color:#555;font-size:13px}
nav a{margin-right:14px;font-size:14px;color:#2c6e9b}table{border-collapse:collapse;margin:8px 0 16px;font-size:13px}
th,td{border:1px solid #d5d9de;padding:4px 8px;text-align:left;vertical-align:top}th{background:#eef3f7}
td.num{text-align:right;font-variant-numeric:tabular-nums}code{font-size:12px;background:#f4f5f7;padding:1px 3px;border-radius:3px;word-break:break-all}
.state-up,.state-stale,.state-other{white-space:nowrap}.state-up{color:#1a7f37;font-weight:600}.state-stale{color:#b35900;font-weight:600}.state-other{color:#6e7781;font-weight:600}
figure{display:inline-block;margin:6px 12px 10px 0;vertical-align:top}figure img{max-width:560px;border:1px solid #d5d9de;image-rendering:pixelated}
figcaption{font-size:12px;color:#555;max-width:560px}.note{color:#b35900;font-size:13px}details{margin:2px 0}
</style>
";

fn nav(o: &mut String) {
    o.push_str("<nav><a href=\"#summary\">Results</a><a href=\"#dag\">Pipeline</a><a href=\"#stages\">Stages</a><a href=\"#figures\">Figures</a><a href=\"#provenance\">Provenance</a></nav>\n");
}

fn state_class(state: &str) -> &'static str {
    match state {
        "up to date" => "state-up",
        "stale" | "cached" => "state-stale",
        _ => "state-other",
    }
}

fn summary(o: &mut String, x: &Inputs<'_>) {
    o.push_str("<section id=\"summary\"><h2>Results</h2>\n");
    let mut any = false;
    for r in x.results {
        for t in &r.tables {
            any = true;
            let _ = write!(
                o,
                "<h3>{} <span class=\"meta\">({}, {})</span></h3>",
                esc(&t.name),
                esc(&r.name),
                state_span(&r.state)
            );
            o.push_str("<table><tr>");
            for c in &t.columns {
                let _ = write!(o, "<th>{}</th>", esc(c));
            }
            o.push_str("</tr>\n");
            for row in &t.rows {
                o.push_str("<tr>");
                for v in row {
                    match v {
                        serde_json::Value::Number(n) => {
                            let _ = write!(
                                o,
                                "<td class=\"num\">{}</td>",
                                n.as_f64().map(results::num).unwrap_or_else(|| n.to_string())
                            );
                        }
                        serde_json::Value::String(s) => {
                            let _ = write!(o, "<td>{}</td>", esc(s));
                        }
                        serde_json::Value::Null => o.push_str("<td>-</td>"),
                        other => {
                            let _ = write!(o, "<td>{}</td>", esc(&other.to_string()));
                        }
                    }
                }
                o.push_str("</tr>\n");
            }
            o.push_str("</table>\n");
        }
    }
    let with_metrics: Vec<&StageResults> = x.results.iter().filter(|r| !r.metrics.is_empty()).collect();
    if !with_metrics.is_empty() {
        any = true;
        o.push_str("<h3>Headline numbers per stage</h3><table><tr><th>stage</th><th>kind</th><th>state</th><th>results</th></tr>\n");
        for r in with_metrics {
            let m: Vec<String> =
                r.metrics.iter().map(|(n, v)| format!("{} <b>{}</b>", esc(n), results::num(*v))).collect();
            let _ = writeln!(
                o,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                esc(&r.name),
                esc(&r.kind),
                state_span(&r.state),
                m.join(" · ")
            );
        }
        o.push_str("</table>\n");
    }
    if !any {
        o.push_str("<p class=\"note\">No results recorded yet: run the pipeline first (<code>msmae run</code>).</p>\n");
    }
    o.push_str("</section>\n");
}

fn state_span(state: &str) -> String {
    format!("<span class=\"{}\">{}</span>", state_class(state), esc(state))
}

/// The stage graph as SVG: columns by depth (longest path from a source), edges as curves.
fn dag(o: &mut String, x: &Inputs<'_>) {
    let nodes = &x.plan.nodes;
    let mut depth = vec![0usize; nodes.len()];
    for i in 0..nodes.len() {
        // Nodes are in topological order: every dep has a smaller index.
        depth[i] = nodes[i].deps.iter().map(|&d| depth[d] + 1).max().unwrap_or(0);
    }
    // Rows within a column: ordered by the mean row of each node's inputs (one barycentre
    // pass, column by column), which keeps most edges short and uncrossed.
    let mut rows_in: BTreeMap<usize, usize> = BTreeMap::new();
    let mut pos = vec![(0usize, 0usize); nodes.len()];
    let cols = depth.iter().max().map_or(1, |m| m + 1);
    for d in 0..cols {
        let mut here: Vec<(f64, usize)> = (0..nodes.len())
            .filter(|&i| depth[i] == d)
            .map(|i| {
                let deps = &nodes[i].deps;
                let bary = if deps.is_empty() {
                    i as f64
                } else {
                    deps.iter().map(|&j| pos[j].1 as f64).sum::<f64>() / deps.len() as f64
                };
                (bary, i)
            })
            .collect();
        here.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
        for (r, &(_, i)) in here.iter().enumerate() {
            pos[i] = (d, r);
        }
        rows_in.insert(d, here.len());
    }
    let (bw, bh, gx, gy) = (150.0, 30.0, 40.0, 14.0);
    let rows = rows_in.values().max().copied().unwrap_or(1);
    let (w, h) = (cols as f64 * (bw + gx) + 10.0, rows as f64 * (bh + gy) + 10.0);
    let xy = |i: usize| (5.0 + pos[i].0 as f64 * (bw + gx), 5.0 + pos[i].1 as f64 * (bh + gy));
    let state: BTreeMap<&str, &str> = x.status.iter().map(|s| (s.name.as_str(), s.state.label())).collect();
    o.push_str("<section id=\"dag\"><h2>Pipeline</h2>\n");
    let _ = writeln!(
        o,
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w:.0}\" height=\"{h:.0}\" viewBox=\"0 0 {w:.0} {h:.0}\" style=\"max-width:100%;height:auto\" role=\"img\" aria-label=\"stage graph\">"
    );
    for (i, n) in nodes.iter().enumerate() {
        for &d in &n.deps {
            let ((x0, y0), (x1, y1)) = (xy(d), xy(i));
            let (sx, sy, ex, ey) = (x0 + bw, y0 + bh / 2.0, x1, y1 + bh / 2.0);
            let _ = writeln!(
                o,
                "<path d=\"M{sx:.1},{sy:.1} C{:.1},{sy:.1} {:.1},{ey:.1} {ex:.1},{ey:.1}\" fill=\"none\" stroke=\"#8c959f\" stroke-width=\"1.3\"/>",
                sx + gx / 2.0,
                ex - gx / 2.0
            );
        }
    }
    for (i, n) in nodes.iter().enumerate() {
        let (x0, y0) = xy(i);
        let st = state.get(n.name.as_str()).copied().unwrap_or("new");
        let fill = match st {
            "up to date" => "#dafbe1",
            "stale" | "cached" => "#fff1d6",
            _ => "#eaeef2",
        };
        let label: String = if n.name.chars().count() > 20 {
            n.name.chars().take(19).collect::<String>() + "…"
        } else {
            n.name.clone()
        };
        let _ = writeln!(
            o,
            "<g><title>{} ({}): {}</title><rect x=\"{x0:.1}\" y=\"{y0:.1}\" width=\"{bw}\" height=\"{bh}\" rx=\"5\" fill=\"{fill}\" stroke=\"#57606a\"/><text x=\"{:.1}\" y=\"{:.1}\" font-size=\"12\" text-anchor=\"middle\" font-family=\"sans-serif\">{}</text></g>",
            esc(&n.name),
            esc(n.kind.kind()),
            esc(st),
            x0 + bw / 2.0,
            y0 + bh / 2.0 + 4.0,
            esc(&label)
        );
    }
    o.push_str("</svg>\n<p class=\"meta\">green: up to date · amber: not current (the lock file records an older result) · grey: not run</p></section>\n");
}

fn stages(o: &mut String, x: &Inputs<'_>) {
    o.push_str("<section id=\"stages\"><h2>Stages</h2>\n<table><tr><th>stage</th><th>kind</th><th>state</th><th>seconds</th><th>started</th><th>host</th><th>artifact</th><th>parameters</th></tr>\n");
    for (n, s) in x.plan.nodes.iter().zip(x.status) {
        let l = x.lock.stage(&n.name);
        let detail = s.state.detail();
        let params = serde_json::to_string(&n.config).unwrap_or_default();
        let _ = writeln!(
            o,
            "<tr><td>{}</td><td>{}</td><td>{}{}</td><td class=\"num\">{}</td><td>{}</td><td>{}</td><td><code>{}</code></td><td><details><summary>with</summary><code>{}</code></details></td></tr>",
            esc(&n.name),
            esc(n.kind.kind()),
            state_span(s.state.label()),
            if detail.is_empty() { String::new() } else { format!("<br><span class=\"meta\">{}</span>", esc(&detail)) },
            l.map(|l| format!("{:.1}", l.run.seconds)).unwrap_or_default(),
            esc(l.map(|l| l.run.started.as_str()).unwrap_or("")),
            esc(l.map(|l| l.run.host.hostname.as_str()).unwrap_or("")),
            esc(l.map(|l| &l.output.digest[..12]).unwrap_or("-")),
            esc(&params)
        );
    }
    o.push_str("</table></section>\n");
}

fn figures(o: &mut String, x: &Inputs<'_>) {
    o.push_str("<section id=\"figures\"><h2>Figures</h2>\n");
    let mut shown = 0;
    for n in &x.plan.nodes {
        if n.output.figures.is_empty() {
            continue;
        }
        let Some(l) = x.lock.stage(&n.name) else { continue };
        let digest = &l.output.digest;
        let Ok(manifest) = x.store.manifest(digest) else {
            let _ = writeln!(
                o,
                "<h3>{}</h3><p class=\"note\">artifact {} is not in the store</p>",
                esc(&n.name),
                esc(&digest[..12])
            );
            continue;
        };
        let current = x.status.iter().find(|s| s.name == n.name).is_some_and(|s| s.state.label() == "up to date");
        let _ = writeln!(
            o,
            "<h3 id=\"fig-{}\">{} <span class=\"meta\">({}{})</span></h3>",
            esc(&n.name),
            esc(&n.name),
            esc(n.kind.kind()),
            if current { String::new() } else { ", NOT CURRENT: recorded results".into() }
        );
        let dir = x.store.object_dir(digest);
        for f in &n.output.figures {
            let files: Vec<&str> = manifest
                .files
                .iter()
                .map(|m| m.path.as_str())
                .filter(|p| msmae_core::artifact::glob_match(&f.pattern, p) && p.ends_with(".png"))
                .take(MAX_FIGURES)
                .collect();
            for (k, rel) in files.iter().enumerate() {
                let Ok(bytes) = std::fs::read(dir.join(rel)) else { continue };
                let b64 = base64::engine::general_purpose::STANDARD.encode(&bytes);
                let caption = if files.len() > 1 {
                    format!("{} ({}/{}): {rel}", f.caption, k + 1, files.len())
                } else {
                    f.caption.clone()
                };
                let _ = writeln!(
                    o,
                    "<figure><img alt=\"{}: {}\" src=\"data:image/png;base64,{b64}\"><figcaption>{}</figcaption></figure>",
                    esc(&n.name),
                    esc(&caption),
                    esc(&caption)
                );
                shown += 1;
            }
        }
    }
    if shown == 0 {
        o.push_str("<p class=\"note\">No figures recorded yet.</p>\n");
    }
    o.push_str("</section>\n");
}

fn provenance(o: &mut String, x: &Inputs<'_>) {
    o.push_str("<section id=\"provenance\"><h2>Provenance</h2>\n<p class=\"meta\">What each recorded artifact is a function of (its cache key's parts) and where it was computed. <code>msmae verify</code> re-hashes the artifacts against the lock file.</p>\n");
    o.push_str(
        "<table><tr><th>stage</th><th>key</th><th>code (version)</th><th>seed</th><th>inputs</th><th>environment</th><th>host</th><th>tools</th></tr>\n",
    );
    for l in &x.lock.stages {
        let p = &l.parts;
        let mut inputs: Vec<String> = p
            .inputs
            .iter()
            .flat_map(|(slot, v)| {
                v.iter().map(move |i| {
                    format!("{slot}: {} <code>{}</code>", esc(&i.stage), esc(&i.digest[..12.min(i.digest.len())]))
                })
            })
            .collect();
        inputs.extend(p.external.iter().map(|e| {
            format!("{} <code>{}</code> ({} files)", esc(&e.path), esc(&e.digest[..12.min(e.digest.len())]), e.files)
        }));
        let env = p
            .env
            .as_ref()
            .map(|e| format!("{} / {} / {}", e.backend, e.device_kind, e.precision))
            .unwrap_or_else(|| "(not numeric)".into());
        let tools: Vec<String> = l.run.tools.iter().map(|(k, v)| format!("{k} {v}")).collect();
        let h = &l.run.host;
        let _ = writeln!(
            o,
            "<tr><td>{}</td><td><code>{}</code></td><td><code>{}</code> (v{})</td><td class=\"num\">{}</td><td>{}</td><td>{}</td><td>{} ({} {}, {} CPUs)</td><td>{}</td></tr>",
            esc(&l.name),
            esc(&l.key[..16.min(l.key.len())]),
            esc(&p.code[..16.min(p.code.len())]),
            p.version,
            p.seed,
            inputs.join("<br>"),
            esc(&env),
            esc(&h.hostname),
            esc(&h.os),
            esc(&h.arch),
            h.cpus,
            esc(&tools.join(", "))
        );
    }
    o.push_str("</table></section>\n");
}
