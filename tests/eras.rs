//! The `kvtuner` group on the older server-args eras (fixture trees written for these tests;
//! `--only kvtuner`, since other groups may not support those eras yet), the release range
//! checks, and `status` as an anchor report on a newer release.

mod common;
use common::*;
use kvtuner_patch::groups::{eras_of, REGISTRY};
use kvtuner_patch::tree::Era;
use std::fs;
use std::path::Path;

/// Parse flags with the fixture's own `ServerArgs` (the fixtures run on the standard library),
/// printing the resulting dataclass; `Err(stderr)` when argparse or the import fails.
fn parse_flags(root: &Path, args: &[&str]) -> Result<String, String> {
    let script = format!(
        "import argparse\nfrom sglang.srt.server_args import ServerArgs\n\
         p = argparse.ArgumentParser()\nServerArgs.add_cli_args(p)\n\
         print(ServerArgs.from_cli_args(p.parse_args({args:?})))\n"
    );
    python_in(root, &script)
}

/// The whole cycle on one era's fixture: snapshot of the diff (git accepts it), apply, the
/// flags parse with the patched tree, verify, apply again changes nothing, revert is
/// byte-identical.
fn full_cycle(
    fixture_name: &str,
    era: &str,
    snapshot_name: &str,
    patch_ids: &[&str],
    after_apply: fn(&Path),
) {
    let t = copy_tree(&fixture(fixture_name), "");
    let root = t.path();
    let original = snapshot(root);

    let (code, v) = run_json(&["status", "--only", "kvtuner"], root);
    assert_eq!(code, 1, "fresh tree: not applied, {v}");
    let r = &v["report"];
    assert_eq!(r["tree"]["era"], era);
    assert_eq!(r["tree"]["layout"], era);
    assert_eq!(r["support"]["supported"], true, "{v}");
    let ids: Vec<&str> = r["groups"][0]["patches"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, patch_ids);
    for a in r["anchors"].as_array().unwrap() {
        assert_eq!(a["found"], true, "{a}");
        assert_eq!(a["file"], SERVER_ARGS);
    }
    assert!(
        parse_flags(root, &["--enable-kvtuner-hicache"]).is_err(),
        "the unpatched fixture must not know the flag"
    );

    let (code, diff, err) = run(&["diff", "--only", "kvtuner"], root);
    assert_eq!(code, 1, "{err}");
    insta::assert_snapshot!(snapshot_name, diff);
    git_apply(root, &diff, false);
    fs::remove_dir_all(root.join(".git")).unwrap();

    let (code, out, err) = run(&["apply", "--only", "kvtuner"], root);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.trim(), format!("applied [kvtuner]: {SERVER_ARGS}"));

    let parsed = parse_flags(
        root,
        &[
            "--enable-kvtuner-hicache",
            "--kvtuner-hicache-nbits-key",
            "2",
            "--kvtuner-hicache-axis-value",
            "1",
            "--kvtuner-hicache-layer-config",
            "preset.yaml",
        ],
    )
    .unwrap();
    for part in [
        "enable_kvtuner_hicache=True",
        "kvtuner_hicache_nbits_key=2",
        "kvtuner_hicache_nbits_value=4",
        "kvtuner_hicache_asym=False",
        "kvtuner_hicache_axis_key=1",
        "kvtuner_hicache_axis_value=1",
        "kvtuner_hicache_q_group_size=64",
        "kvtuner_hicache_residual_length=128",
        "kvtuner_hicache_layer_config='preset.yaml'",
        "page_budget=16",
    ] {
        assert!(parsed.contains(part), "{part} not in {parsed}");
    }
    let err = parse_flags(root, &["--kvtuner-hicache-nbits-value", "3"]).unwrap_err();
    assert!(err.contains("invalid choice"), "{err}");
    after_apply(root);

    let (code, v) = run_json(&["verify", "--only", "kvtuner"], root);
    assert_eq!(code, 0, "{v}");
    assert_eq!(v["report"]["files"][0]["compiles"], true);

    let applied = snapshot(root);
    let (code, out, _) = run(&["apply", "--only", "kvtuner"], root);
    assert_eq!(code, 0);
    assert!(out.contains("nothing to do"), "{out}");
    assert_same_tree(&applied, &snapshot(root));
    assert_eq!(run(&["status", "--only", "kvtuner"], root).0, 0);

    let (code, _, err) = run(&["revert"], root);
    assert_eq!(code, 0, "{err}");
    assert_same_tree(&original, &snapshot(root));
}

#[test]
fn dataclass_add_argument_era_full_cycle() {
    full_cycle(
        "sglang-0.5.13",
        "dataclass-add-argument",
        "fixture_0_5_13_kvtuner_diff",
        &["server-args-fields", "cli-arguments"],
        |_| {},
    );
}

#[test]
fn annotated_server_args_era_full_cycle() {
    full_cycle(
        "sglang-0.5.15",
        "annotated-server-args",
        "fixture_0_5_15_kvtuner_diff",
        &["server-args-fields"],
        |_| {},
    );
}

/// 0.5.17 - 0.5.19: the same fields, each also in the `memory` namespace (what SGLang builds
/// `get_memory()` from).
#[test]
fn namespaced_server_args_era_full_cycle() {
    full_cycle(
        "sglang-0.5.18",
        "namespaced-server-args",
        "fixture_0_5_18_kvtuner_diff",
        &["server-args-fields"],
        |root| {
            let out = std::process::Command::new("python3")
                .args([
                    "-B",
                    "-c",
                    "from sglang.srt.server_args import ServerArgs\n\
                     from sglang.srt.arg_groups.arg_utils import namespaces\n\
                     ns = namespaces(ServerArgs)\n\
                     print(sorted(k for k, v in ns.items() if 'kvtuner' in k and v == 'memory'))",
                ])
                .env("PYTHONPATH", root)
                .output()
                .unwrap();
            let text = String::from_utf8_lossy(&out.stdout);
            assert_eq!(
                text.matches("kvtuner").count(),
                9,
                "{text}{}",
                String::from_utf8_lossy(&out.stderr)
            );
        },
    );
}

/// A block removed by hand in one of the two edits of the oldest era is drift, not "applied".
#[test]
fn dataclass_era_half_removed_is_drift() {
    let t = copy_tree(&fixture("sglang-0.5.13"), "");
    assert_eq!(run(&["apply", "--only", "kvtuner"], t.path()).0, 0);
    let path = t.path().join(SERVER_ARGS);
    let text = fs::read_to_string(&path).unwrap();
    let start = text
        .find("        # >>> kvtuner-patch:kvtuner/cli-arguments")
        .unwrap();
    let end_marker = "        # <<< kvtuner-patch:kvtuner/cli-arguments\n";
    let end = text.find(end_marker).unwrap() + end_marker.len();
    fs::write(&path, format!("{}{}", &text[..start], &text[end..])).unwrap();
    let (code, v) = run_json(&["status", "--only", "kvtuner"], t.path());
    assert_eq!(code, 1);
    assert_eq!(v["report"]["groups"][0]["state"], "drifted");
    let (code, out, _) = run(&["verify", "--only", "kvtuner"], t.path());
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("kvtuner/cli-arguments: sglang/srt/server_args.py: not applied, but other patches of the group are"),
        "{out}"
    );
    let (code, _, err) = run(&["apply", "--only", "kvtuner"], t.path());
    assert_eq!(
        code, 1,
        "a half-applied group is refused, not completed: {err}"
    );
}

/// Mutated trees of the older eras (and releases outside the list) are refused by `apply`
/// with the reason, and nothing is written.
#[test]
fn older_era_mutations_and_out_of_range_releases_are_refused() {
    let cases: &[(&str, i32, &[&str])] = &[
        (
            "dataclass-flag-renamed",
            1,
            &[
                "kvtuner/cli-arguments",
                SERVER_ARGS,
                "call `add_argument(\"--hicache-storage-backend-extra-config\", ...)`",
                "found 0 matches",
            ],
        ),
        (
            "annotated-field-duplicated",
            1,
            &[
                "kvtuner/server-args-fields",
                "field `hicache_storage_backend_extra_config` in class `ServerArgs`",
                "found 2 matches (expected exactly 1) at line 26, line 31",
            ],
        ),
        (
            "older-release",
            2,
            &[
                "SGLang 0.5.2 is older than the oldest release",
                "nothing was changed",
            ],
        ),
    ];
    for (name, want, parts) in cases {
        let t = mutated_fixture(name);
        let before = snapshot(t.path());
        for args in [
            &["apply", "--only", "kvtuner"][..],
            &["apply", "--only", "kvtuner", "--dry-run"],
            &["diff", "--only", "kvtuner"],
        ] {
            let (code, out, err) = run(args, t.path());
            assert_eq!(code, *want, "{name} {args:?}: {out}{err}");
            for p in *parts {
                assert!(err.contains(p), "{name} {args:?}: `{p}` not in: {err}");
            }
        }
        assert_same_tree(&before, &snapshot(t.path()));
    }
}

/// A version whose era disagrees with the files on disk (a half-upgraded tree) is refused.
#[test]
fn release_with_another_eras_layout_is_refused() {
    let t = copy_tree(&fixture("sglang-0.5.13"), "");
    fs::write(
        t.path().join("sglang/version.py"),
        "__version__ = \"0.5.15\"\n",
    )
    .unwrap();
    let before = snapshot(t.path());
    let (code, v) = run_json(&["status", "--only", "kvtuner"], t.path());
    assert_eq!(code, 2);
    let reason = v["report"]["support"]["reason"].as_str().unwrap();
    assert!(
        reason.contains("era annotated-server-args")
            && reason.contains("look like era dataclass-add-argument")
            && reason.contains("mixed tree"),
        "{reason}"
    );
    let (code, _, err) = run(&["apply", "--only", "kvtuner"], t.path());
    assert_eq!(code, 2, "{err}");
    assert_same_tree(&before, &snapshot(t.path()));
}

/// On a release newer than the list, `status` is a report of which anchors still match.
#[test]
fn status_on_a_newer_release_reports_each_anchor() {
    let t = mutated_fixture("newer-release");
    let (code, v) = run_json(&["status", "--only", "kvtuner"], t.path());
    assert_eq!(code, 2);
    let r = &v["report"];
    assert_eq!(r["support"]["supported"], false);
    assert!(r["support"]["reason"]
        .as_str()
        .unwrap()
        .contains("newer than the newest release this tool knows (0.5.23)"));
    assert_eq!(r["anchors"][0]["patch"], "kvtuner/memory-fields");
    assert_eq!(r["anchors"][0]["found"], true);
    assert_eq!(
        r["anchors"][0]["file"],
        "sglang/srt/arg_groups/fields/memory.py"
    );
    let (_, out, _) = run(&["status", "--only", "kvtuner"], t.path());
    assert!(
        out.contains("found     kvtuner/memory-fields")
            && out.contains("sglang/srt/arg_groups/fields/memory.py"),
        "{out}"
    );

    // The same release with the class renamed: the report names what it did not find.
    let memory = t.path().join("sglang/srt/arg_groups/fields/memory.py");
    let text = fs::read_to_string(&memory).unwrap();
    fs::write(&memory, text.replace("class Memory(", "class MemoryArgs(")).unwrap();
    let (code, v) = run_json(&["status", "--only", "kvtuner"], t.path());
    assert_eq!(code, 2);
    let a = &v["report"]["anchors"][0];
    assert_eq!(a["found"], false, "{a}");
    assert!(
        a["detail"].as_str().unwrap().contains("class `Memory`"),
        "{a}"
    );
    let (_, out, _) = run(&["status", "--only", "kvtuner"], t.path());
    assert!(out.contains("NOT FOUND kvtuner/memory-fields"), "{out}");
}

/// Without `--only`, a tree is refused when any registered group has no form for its era,
/// naming each such group: never half-patched.
#[test]
fn all_groups_on_an_older_era_need_every_group_to_support_it() {
    let missing: Vec<&str> = REGISTRY
        .iter()
        .filter(|e| !eras_of(e).contains(&Era::DataclassAddArgument))
        .map(|e| e.id)
        .collect();
    let t = copy_tree(&fixture("sglang-0.5.13"), "");
    let before = snapshot(t.path());
    let (code, out, err) = run(&["apply"], t.path());
    if missing.is_empty() {
        assert_eq!(code, 0, "{err}");
        return;
    }
    assert_eq!(code, 2, "{out}{err}");
    for id in &missing {
        assert!(
            err.contains(&format!(
                "group `{id}` has no form for era dataclass-add-argument yet"
            )),
            "{id}: {err}"
        );
    }
    assert!(err.contains("nothing was changed"), "{err}");
    assert_same_tree(&before, &snapshot(t.path()));
    let (code, v) = run_json(&["status"], t.path());
    assert_eq!(code, 2);
    let listed: Vec<&str> = v["report"]["unsupported_groups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["id"].as_str().unwrap())
        .collect();
    assert_eq!(listed, missing);
    assert_eq!(v["report"]["release_support"]["supported"], true);
}
