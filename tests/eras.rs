//! The `kvtuner` group on the older server-args eras (fixture trees written for these tests;
//! `--only kvtuner`, since other groups may not support those eras yet), the release range
//! checks, and `status` as an anchor report on a newer release.

mod common;
use common::*;
use kvtuner_patch::era::Era;
use kvtuner_patch::groups::{eras_of, REGISTRY};
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
        "kvtuner_hicache_sink_tokens=1",
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

    assert_reapply_is_noop_and_revert_restores(root, &["--only", "kvtuner"], &original);
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
                kvtuner_patch::groups::kvtuner::flags().len(),
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
    let newest = kvtuner_patch::era::newest();
    assert!(r["support"]["reason"].as_str().unwrap().contains(&format!(
        "newer than the newest release this tool knows ({newest})"
    )));
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

/// A release that moves anchor files between modules (the pretend release of
/// `docs/adding-a-release.md`) needs no new form: every anchor names a class or function found
/// by structure, so status finds each one in its new file and the whole cycle works unchanged.
#[test]
fn anchor_files_moved_by_a_release_are_found_by_structure() {
    let t = copy_tree(&fixture("sglang-0.5.23"), "");
    let root = t.path();
    let moves = [
        (HOOK, "sglang/srt/arg_groups/hooks/hicache.py"),
        (CONTROLLER, "sglang/srt/managers/hicache_controller.py"),
        (MHA, "sglang/srt/mem_cache/pool_host/dense.py"),
        (FACTORY, "sglang/srt/mem_cache/storage/factory.py"),
    ];
    for (from, to) in moves {
        fs::create_dir_all(root.join(to).parent().unwrap()).unwrap();
        fs::rename(root.join(from), root.join(to)).unwrap();
    }
    let original = snapshot(root);
    let (code, v) = run_json(&["status"], root);
    assert_eq!(code, 1, "supported, not applied: {v}");
    let mut files: Vec<&str> = Vec::new();
    for a in v["report"]["anchors"].as_array().unwrap() {
        assert_eq!(a["found"], true, "{a}");
        files.push(a["file"].as_str().unwrap());
    }
    for (from, to) in moves {
        assert!(
            files.contains(&to) && !files.contains(&from),
            "{to}: {files:?}"
        );
    }
    assert_eq!(run(&["apply"], root).0, 0);
    let (code, out, err) = run(&["verify"], root);
    assert_eq!(code, 0, "{out}{err}");
    let (code, out, _) = run(&["apply"], root);
    assert!(code == 0 && out.starts_with("nothing to do"), "{out}");
    assert_eq!(run(&["revert"], root).0, 0);
    assert_same_tree(&original, &snapshot(root));
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

/// Every group on the oldest era's fixture: the diff (snapshot; git accepts it), apply, the
/// patched tree at work with the standard library (the `juicefs` choice parses, the scheduler
/// entry point hands its arguments to the package, the stock host pool class still builds
/// its own pool through the injected `__new__` without the flag), verify, apply again
/// changes nothing, revert is byte-identical.
#[test]
fn dataclass_era_all_groups_full_cycle() {
    let t = copy_tree(&fixture("sglang-0.5.13"), "");
    let root = t.path();
    let original = snapshot(root);
    let (code, v) = run_json(&["status"], root);
    assert_eq!(code, 1, "fresh tree: supported, not applied: {v}");
    let ids: Vec<&str> = v["report"]["groups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["kvtuner", "hostpool", "juicefs"]);

    let (code, diff, err) = run(&["diff"], root);
    assert_eq!(code, 1, "{err}");
    insta::assert_snapshot!("fixture_0_5_13_all_groups_diff", elide_new_files(&diff));
    git_apply(root, &diff, false);
    fs::remove_dir_all(root.join(".git")).unwrap();

    let (code, _, err) = run(&["apply"], root);
    assert_eq!(code, 0, "{err}");
    let out = python_in(
        root,
        "import argparse\n\
         from sglang.srt.server_args import ServerArgs\n\
         from sglang.srt.managers.scheduler import run_scheduler_process\n\
         from sglang.srt.mem_cache.kvtuner_hicache import config\n\
         from sglang.srt.mem_cache.memory_pool_host import MHATokenToKVPoolHost\n\
         p = argparse.ArgumentParser()\nServerArgs.add_cli_args(p)\n\
         a = ServerArgs.from_cli_args(p.parse_args(['--hicache-storage-backend', 'juicefs']))\n\
         run_scheduler_process(a)\n\
         dev = type('Dev', (), {'size': 8, 'head_num': 2})()\n\
         pool = MHATokenToKVPoolHost(dev, 2.0, 0, 4, 'page_first')\n\
         print(a.hicache_storage_backend, config._scheduler_server_args is a,\n\
               '__new__' in vars(MHATokenToKVPoolHost), type(pool).__name__, pool.size)\n",
    );
    assert_eq!(
        out.unwrap().trim(),
        "juicefs True True MHATokenToKVPoolHost 16"
    );

    let (code, v) = run_json(&["verify"], root);
    assert_eq!(code, 0, "{v}");
    assert_reapply_is_noop_and_revert_restores(root, &[], &original);
}

/// The zero-copy choice is looked for in the first of `attach_storage_backend` (0.5.9+) and
/// `__init__` (0.5.3 - 0.5.8) that `HiCacheController` defines, and only there: in `__init__`
/// when that is its home, drift (nothing written) when the method that exists lacks it or
/// neither exists.
#[test]
fn zero_copy_choice_is_looked_for_in_its_one_method() {
    const ATTACH: &str = "        if storage_backend is not None:\n            self.attach_storage_backend(storage_backend)\n\n    def attach_storage_backend(self, storage_backend):\n        self.storage_backend_type = storage_backend\n";
    let edited = |from: &str, to: &str| {
        let t = copy_tree(&fixture("sglang-0.5.13"), "");
        let path = t.path().join(CONTROLLER);
        let text = fs::read_to_string(&path).unwrap();
        assert!(text.contains(from), "fixture changed: {from}");
        fs::write(&path, text.replace(from, to)).unwrap();
        t
    };

    // 0.5.3 - 0.5.8: the choice is made in `__init__`, and the branch goes there.
    let t = edited(
        ATTACH,
        "        if storage_backend is not None:\n            self.storage_backend_type = storage_backend\n",
    );
    let (code, _, err) = run(&["apply"], t.path());
    assert_eq!(code, 0, "{err}");
    let text = fs::read_to_string(t.path().join(CONTROLLER)).unwrap();
    let init = text.find("def __init__").unwrap();
    let branch = text
        .find("elif self.storage_backend_type == \"juicefs\":")
        .unwrap();
    assert!(branch > init && !text.contains("def attach_storage_backend"));

    // Refused, nothing written: the method that exists lost the chain (never looked for in
    // another method), or neither method exists.
    let lost = edited(
        "self.storage_backend_type in [\"hf3fs\", \"mooncake\"]",
        "self.storage_backend_type in [\"mooncake\"]",
    );
    let neither = edited("def __init__(self,", "def setup(self,");
    let path = neither.path().join(CONTROLLER);
    let text = fs::read_to_string(&path).unwrap();
    fs::write(
        &path,
        text.replace("def attach_storage_backend(", "def attach_backend("),
    )
    .unwrap();
    for (t, want) in [
        (
            &lost,
            "juicefs/zero-copy: sglang/srt/managers/cache_controller.py: looked for if/elif chain mentioning `\"hf3fs\"`: found 0 matches",
        ),
        (
            &neither,
            "juicefs/zero-copy: sglang/srt/managers/cache_controller.py: looked for one of the methods `attach_storage_backend`, `__init__` in class `HiCacheController`: found 0 matches",
        ),
    ] {
        let before = snapshot(t.path());
        let (code, _, err) = run(&["apply"], t.path());
        assert_eq!(code, 1, "{err}");
        assert!(err.contains(want), "`{want}` not in: {err}");
        assert_same_tree(&before, &snapshot(t.path()));
    }
}
