//! The engine on the real SGLang 0.5.23 release tree (the wheel, downloaded once and cached by
//! `scripts/sglang-wheel.sh`). No network means this test FAILS, loudly: it is never skipped.

mod common;
use common::*;
use std::fs;
use std::path::PathBuf;
use std::time::Instant;

const VERSION: &str = "0.5.23";
const MEMORY: &str = "sglang/srt/arg_groups/fields/memory.py";

fn release_tree() -> PathBuf {
    let script = repo().join("scripts/sglang-wheel.sh");
    let out = std::process::Command::new("bash")
        .arg(&script)
        .arg(VERSION)
        .output()
        .expect("bash runs");
    assert!(
        out.status.success(),
        "downloading SGLang {VERSION} with {} failed (network or PyPI unreachable?): {}",
        script.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let dir = PathBuf::from(String::from_utf8(out.stdout).unwrap().trim());
    assert!(
        dir.join("sglang/srt").is_dir(),
        "{} holds no sglang/srt",
        dir.display()
    );
    dir
}

#[test]
fn real_0_5_23_apply_verify_revert() {
    let t = copy_tree(&release_tree(), "");
    let root = t.path();
    let original = snapshot(root);

    let (code, v) = run_json(&["status"], root);
    assert_eq!(code, 1);
    let r = &v["report"];
    assert_eq!(r["tree"]["version"], VERSION);
    assert_eq!(r["tree"]["version_source"], "sglang/_version.py");
    assert_eq!(r["tree"]["era"], "memory-struct");
    assert_eq!(r["support"]["supported"], true);
    assert_eq!(r["groups"][0]["state"], "not_applied");
    assert_eq!(
        r["groups"][0]["patches"][0]["file"], MEMORY,
        "class Memory found where 0.5.23 declares it"
    );

    // The diff is stable (snapshot), touches only memory.py, and git accepts it.
    let (code, diff, err) = run(&["diff"], root);
    assert_eq!(code, 1, "{err}");
    insta::assert_snapshot!("real_0_5_23_kvtuner_diff", diff);
    git_apply(root, &diff, false);
    fs::remove_dir_all(root.join(".git")).unwrap();
    assert_same_tree(&original, &snapshot(root));

    let start = Instant::now();
    let (code, out, err) = run(&["apply"], root);
    eprintln!("apply on the real tree: {:?}", start.elapsed());
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.trim(), format!("applied [kvtuner]: {MEMORY}"));
    let text = fs::read_to_string(root.join(MEMORY)).unwrap();
    let class_at = text.find("class Memory(msgspec.Struct):").unwrap();
    let block_at = text
        .find("    # >>> kvtuner-patch:kvtuner/memory-fields sha256=")
        .unwrap();
    assert!(
        block_at > class_at
            && text[block_at..]
                .contains("    kvtuner_hicache_layer_config: A[\n        Optional[str],")
    );
    assert!(
        text.ends_with("    # <<< kvtuner-patch:kvtuner/memory-fields\n"),
        "appended at the end of class Memory"
    );

    let start = Instant::now();
    let (code, v) = run_json(&["verify"], root);
    eprintln!("verify on the real tree: {:?}", start.elapsed());
    assert_eq!(code, 0, "{v}");
    assert_eq!(v["report"]["files"][0]["compiles"], true);

    let applied = snapshot(root);
    let (code, out, _) = run(&["apply"], root);
    assert_eq!(code, 0);
    assert!(out.contains("nothing to do"));
    assert_same_tree(&applied, &snapshot(root));
    assert_eq!(run(&["status"], root).0, 0);

    let (code, _, err) = run(&["revert"], root);
    assert_eq!(code, 0, "{err}");
    assert_same_tree(&original, &snapshot(root));
}
