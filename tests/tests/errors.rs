//! Every class of pipeline-file error is reported before any stage runs, with the file,
//! line, column and offending key.

use std::path::Path;

use msmae_tests::fixture::registry;

fn errors(src: &str) -> String {
    let spec = match msmae_pipeline::parse(Path::new("pipelines/x.yaml"), src, &[]) {
        Ok(s) => s,
        Err(e) => return e.to_string(),
    };
    match msmae_pipeline::plan(spec, &registry()) {
        Ok(_) => panic!("expected an error for:\n{src}"),
        Err(e) => e.to_string(),
    }
}

fn assert_error(src: &str, location: &str, message: &str) {
    let e = errors(src);
    assert!(
        e.lines().any(|l| l.starts_with(location) && l.contains(message)),
        "expected `{location}` … `{message}` in:\n{e}"
    );
}

#[test]
fn unknown_kind_suggests_the_nearest() {
    assert_error(
        "stages:\n  a: { uses: test/sourse }\n",
        "pipelines/x.yaml:2:",
        "stages.a.uses: unknown stage kind `test/sourse` (did you mean `test/source`?)",
    );
}

#[test]
fn config_type_errors_point_at_the_key_inside_with() {
    let src = "stages:\n  a:\n    uses: test/source\n    with:\n      value: 3\n";
    // an integer is not a string
    assert_error(
        src,
        "pipelines/x.yaml:5:",
        "stages.a.with.value: invalid type: integer `3`, expected a string (stage `a`, kind `test/source`)",
    );
    assert_error(
        "stages:\n  a:\n    uses: test/source\n    with: { value: x, vaule: y }\n",
        "pipelines/x.yaml:4:",
        "unknown field `vaule`",
    );
    assert_error(
        "stages:\n  a:\n    uses: test/source\n",
        "pipelines/x.yaml:2:",
        "stages.a.with: missing field `value`",
    );
    let long = "x".repeat(1001);
    assert_error(
        &format!("stages:\n  a:\n    uses: test/source\n    with:\n      value: {long}\n"),
        "pipelines/x.yaml:5:",
        "stages.a.with.value: too long",
    );
}

#[test]
fn needs_must_name_stages_and_fit_slots() {
    assert_error(
        "stages:\n  a: { uses: test/source, with: { value: x } }\n  b:\n    uses: test/concat\n    needs: [aa]\n",
        "pipelines/x.yaml:5:",
        "stages.b.needs.0: `aa` is not a stage of this pipeline (did you mean `a`?)",
    );
    assert_error(
        "stages:\n  a: { uses: test/source, with: { value: x } }\n  b: { uses: test/concat, needs: [b] }\n",
        "pipelines/x.yaml:3:",
        "cannot need itself",
    );
    // kind mismatch: a table where blobs are expected
    assert_error(
        "stages:\n  t: { uses: test/ingest, with: { root: . } }\n  b:\n    uses: test/concat\n    needs: [t]\n",
        "pipelines/x.yaml:5:",
        "`t` produces `table`, which no input of kind `test/concat` takes; its slots: parts (blob)",
    );
    assert_error(
        "stages:\n  t: { uses: test/ingest, with: { root: . } }\n  b:\n    uses: test/concat\n    needs: { parts: [t] }\n",
        "pipelines/x.yaml:5:",
        "slot `parts` takes `blob`",
    );
    assert_error(
        "stages:\n  b:\n    uses: test/concat\n    needs: { partz: [] }\n",
        "pipelines/x.yaml:4:",
        "kind `test/concat` has no input slot `partz`; its slots: parts (blob)",
    );
    // arity: concat needs at least one part
    assert_error(
        "stages:\n  b: { uses: test/concat }\n",
        "pipelines/x.yaml:2:",
        "input `parts` of kind `test/concat` takes at least one `blob` artifact (blobs to join), got 0",
    );
}

#[test]
fn same_kind_slots_fill_in_order_and_overflow_is_ambiguous() {
    let ok = "stages:\n  a: { uses: test/source, with: { value: a } }\n  b: { uses: test/source, with: { value: b } }\n  p: { uses: test/pair, needs: [a, b] }\n";
    let plan = msmae_pipeline::plan(msmae_pipeline::parse(Path::new("x.yaml"), ok, &[]).expect("parse"), &registry())
        .expect("plan");
    let p = &plan.nodes[plan.index_of("p").expect("p")];
    assert_eq!(p.bindings.keys().collect::<Vec<_>>(), ["left", "right"]);
    assert_error(
        "stages:\n  a: { uses: test/source, with: { value: a } }\n  b: { uses: test/source, with: { value: b } }\n  c: { uses: test/source, with: { value: c } }\n  p:\n    uses: test/pair\n    needs: [a, b, c]\n",
        "pipelines/x.yaml:7:",
        "`c` (blob) fits several slots (left, right); name them",
    );
}

#[test]
fn cycles_are_named() {
    let e = errors(
        "stages:\n  a: { uses: test/concat, needs: [c] }\n  b: { uses: test/concat, needs: [a] }\n  c: { uses: test/concat, needs: [b] }\n",
    );
    assert!(e.contains("dependency cycle: "), "{e}");
    assert!(["a → b → c → a", "b → c → a → b", "c → a → b → c"].iter().any(|c| e.contains(c)), "{e}");
}

#[test]
fn all_problems_are_reported_at_once() {
    let e = errors(
        "stages:\n  a: { uses: nope/x }\n  b: { uses: test/source, with: { value: [1] } }\n  c: { uses: test/concat, needs: [zz] }\n",
    );
    assert_eq!(e.lines().count(), 3, "{e}");
}

#[test]
fn a_missing_dataset_folder_stops_the_run_before_it_starts() {
    let e = errors("stages:\n  a:\n    uses: test/ingest\n    with: { root: no/such/dataset }\n");
    assert!(
        e.starts_with(
            "pipelines/x.yaml:4:5: stages.a.with: stage `a` reads `pipelines/no/such/dataset`, which does not exist"
        ),
        "{e}"
    );
}
