//! The `kvtuner` group on one real release of each older server-args era (the wheels,
//! downloaded once and cached by `scripts/sglang-wheel.sh`; no network means these FAIL, they
//! are never skipped). Every release of the list is checked by `scripts/release-matrix.sh`;
//! these pin the exact diff on real SGLang code.

mod common;
use common::*;
use std::fs;

fn cycle(version: &str, era: &str, snapshot_name: &str, blocks: &[&str]) {
    let t = copy_tree(&release_tree(version), "");
    let root = t.path();
    let original = snapshot(root);

    let (code, v) = run_json(&["status", "--only", "kvtuner"], root);
    assert_eq!(code, 1, "{v}");
    assert_eq!(v["report"]["tree"]["version"], version);
    assert_eq!(v["report"]["tree"]["era"], era);
    assert_eq!(v["report"]["tree"]["layout"], era);
    assert_eq!(v["report"]["support"]["supported"], true);

    let (code, diff, err) = run(&["diff", "--only", "kvtuner"], root);
    assert_eq!(code, 1, "{err}");
    insta::assert_snapshot!(snapshot_name, diff);

    let (code, out, err) = run(&["apply", "--only", "kvtuner"], root);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.trim(), format!("applied [kvtuner]: {SERVER_ARGS}"));
    let text = fs::read_to_string(root.join(SERVER_ARGS)).unwrap();
    for b in blocks {
        assert_eq!(
            text.matches(&format!("# >>> kvtuner-patch:kvtuner/{b} sha256="))
                .count(),
            1,
            "{b}"
        );
    }
    assert_eq!(run(&["verify", "--only", "kvtuner"], root).0, 0);
    assert_reapply_is_noop_and_revert_restores(root, &["--only", "kvtuner"], &original);
}

#[test]
fn real_0_5_3_dataclass_add_argument() {
    cycle(
        "0.5.3",
        "dataclass-add-argument",
        "real_0_5_3_kvtuner_diff",
        &["server-args-fields", "cli-arguments"],
    );
}

#[test]
fn real_0_5_14_annotated_server_args() {
    cycle(
        "0.5.14",
        "annotated-server-args",
        "real_0_5_14_kvtuner_diff",
        &["server-args-fields"],
    );
}

#[test]
fn real_0_5_19_namespaced_server_args() {
    cycle(
        "0.5.19",
        "namespaced-server-args",
        "real_0_5_19_kvtuner_diff",
        &["server-args-fields"],
    );
}
