//! The CLI on the fixture trees: exit codes, --json, refusals, the full apply/verify/revert cycle.

mod common;
use common::*;
use std::fs;

const EDITED: [&str; 6] = [MEMORY, HOOK, CONTROLLER, MHA, MLA, FACTORY];

#[test]
fn status_of_a_fresh_tree() {
    let t = copy_tree(&fixture("sglang-0.5.23"), "");
    let (code, v) = run_json(&["status"], t.path());
    assert_eq!(code, 1, "not applied is exit 1");
    assert_eq!(v["ok"], false);
    let r = &v["report"];
    assert_eq!(r["tree"]["version"], "0.5.23");
    assert_eq!(r["tree"]["era"], "memory-struct");
    assert_eq!(r["support"]["supported"], true);
    assert_eq!(r["manifest"], false);
    assert_eq!(r["groups"][0]["id"], "kvtuner");
    assert_eq!(r["groups"][0]["state"], "not_applied");
    assert_eq!(r["groups"][0]["patches"][0]["file"], MEMORY);
    assert_eq!(r["groups"][1]["id"], "hostpool");
    assert_eq!(r["groups"][2]["id"], "juicefs");
    for g in 1..3 {
        assert_eq!(r["groups"][g]["state"], "not_applied");
    }
    for a in r["anchors"].as_array().unwrap() {
        assert_eq!(a["found"], true, "{a}");
    }
}

#[test]
fn dry_run_diff_is_snapshotted_writes_nothing_and_git_applies() {
    let t = copy_tree(&fixture("sglang-0.5.23"), "");
    let before = snapshot(t.path());
    let (code, diff, err) = run(&["apply", "--dry-run"], t.path());
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("nothing written"));
    insta::assert_snapshot!("fixture_0_5_23_diff", elide_new_files(&diff));
    assert_same_tree(&before, &snapshot(t.path()));

    // `diff` prints the same and exits 1 (differences).
    let (code, diff2, _) = run(&["diff"], t.path());
    assert_eq!(code, 1);
    assert_eq!(diff, diff2);

    // git accepts it, and applying it with git gives exactly what `apply` writes.
    let by_git = copy_tree(&fixture("sglang-0.5.23"), "");
    git_apply(by_git.path(), &diff, true);
    let (code, _, err) = run(&["apply"], t.path());
    assert_eq!(code, 0, "{err}");
    let mut by_git = snapshot(by_git.path());
    by_git.retain(|k, _| !k.starts_with(".git"));
    let mut applied = snapshot(t.path());
    applied.retain(|k, _| !k.starts_with("sglang/.kvtuner-patch"));
    assert_same_tree(&by_git, &applied);
}

#[test]
fn apply_verify_revert_is_byte_identical_and_apply_is_idempotent() {
    let t = copy_tree(&fixture("sglang-0.5.23"), "");
    let original = snapshot(t.path());

    let (code, out, err) = run(&["apply"], t.path());
    assert_eq!(code, 0, "{err}");
    assert!(
        out.starts_with("applied [kvtuner, hostpool, juicefs]: "),
        "{out}"
    );
    let text = fs::read_to_string(t.path().join(MEMORY)).unwrap();
    for f in kvtuner_patch::groups::kvtuner::flags()
        .iter()
        .map(|f| &f.name)
    {
        assert!(text.contains(&format!("    {f}: A[")), "{f} missing");
    }
    let applied = snapshot(t.path());

    let (code, out, _) = run(&["apply"], t.path());
    assert_eq!(code, 0);
    assert!(out.contains("nothing to do"), "{out}");
    assert_same_tree(&applied, &snapshot(t.path()));
    let (code, v) = run_json(&["apply"], t.path());
    assert_eq!(code, 0);
    assert_eq!(v["report"]["applied"], serde_json::json!([]));
    assert_eq!(
        v["report"]["already_applied"],
        serde_json::json!(["kvtuner", "hostpool", "juicefs"])
    );

    let (code, out, _) = run(&["diff"], t.path());
    assert_eq!((code, out.as_str()), (0, ""), "no differences once applied");

    let (code, v) = run_json(&["verify"], t.path());
    assert_eq!(code, 0, "{v}");
    assert_eq!(v["report"]["ok"], true);
    assert_eq!(v["report"]["files"][0]["file"], MEMORY);
    assert_eq!(v["report"]["files"][0]["compiles"], true);
    assert_eq!(v["report"]["kvtuner_quant"], serde_json::Value::Null);

    let (code, v) = run_json(&["status"], t.path());
    assert_eq!(code, 0);
    assert_eq!(v["report"]["groups"][0]["state"], "applied");
    assert_eq!(v["report"]["manifest"], true);

    let (code, v) = run_json(&["revert"], t.path());
    assert_eq!(code, 0, "{v}");
    assert_eq!(v["report"]["restored"], serde_json::json!(EDITED));
    assert!(v["report"]["removed"]
        .as_array()
        .unwrap()
        .contains(&serde_json::json!(format!("{PACKAGE}/"))));
    assert_same_tree(&original, &snapshot(t.path()));

    let (code, out, _) = run(&["revert"], t.path());
    assert_eq!((code, out.trim()), (0, "nothing to revert"));
}

#[test]
fn hand_edited_block_is_drift_and_revert_refuses_without_force() {
    let t = copy_tree(&fixture("sglang-0.5.23"), "");
    let original = snapshot(t.path());
    assert_eq!(run(&["apply"], t.path()).0, 0);
    let path = t.path().join(MEMORY);
    let text = fs::read_to_string(&path).unwrap();
    fs::write(&path, text.replace("] = 128\n", "] = 256\n")).unwrap();
    let edited = snapshot(t.path());

    let (code, out, _) = run(&["verify"], t.path());
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("edited by hand"), "{out}");
    assert!(out.contains(&format!("{MEMORY}:")), "{out}");
    let (code, v) = run_json(&["status"], t.path());
    assert_eq!(code, 1);
    assert_eq!(v["report"]["groups"][0]["state"], "drifted");
    let (code, _, err) = run(&["apply"], t.path());
    assert_eq!(code, 1, "apply refuses a drifted group: {err}");

    let (code, _, err) = run(&["revert"], t.path());
    assert_eq!(code, 1);
    assert!(err.contains(MEMORY) && err.contains("--force"), "{err}");
    assert_same_tree(&edited, &snapshot(t.path()));
    let (code, v) = run_json(&["revert"], t.path());
    assert_eq!(code, 1);
    assert_eq!(v["ok"], false);
    assert_eq!(v["exit_code"], 1);
    assert!(v["problems"][0].as_str().unwrap().starts_with(MEMORY));

    let (code, out, _) = run(&["revert", "--force"], t.path());
    assert_eq!(code, 0);
    assert!(out.contains("forced"), "{out}");
    assert_same_tree(&original, &snapshot(t.path()));
}

#[test]
fn edit_outside_the_block_keeps_verify_green_but_blocks_revert() {
    let t = copy_tree(&fixture("sglang-0.5.23"), "");
    assert_eq!(run(&["apply"], t.path()).0, 0);
    let path = t.path().join(MEMORY);
    let text = fs::read_to_string(&path).unwrap();
    fs::write(&path, text.replace("] = 16\n", "] = 32\n")).unwrap();
    let (code, out, _) = run(&["verify"], t.path());
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("note:") && out.contains("--force"), "{out}");
    assert_eq!(run(&["revert"], t.path()).0, 1);
}

#[test]
fn without_manifest_revert_refuses_and_force_strips_markers() {
    let t = copy_tree(&fixture("sglang-0.5.23"), "");
    let original = snapshot(t.path());
    assert_eq!(run(&["apply"], t.path()).0, 0);
    fs::remove_dir_all(t.path().join("sglang/.kvtuner-patch")).unwrap();
    let (code, _, err) = run(&["revert"], t.path());
    assert_eq!(code, 1);
    assert!(err.contains("no manifest") && err.contains(MEMORY), "{err}");
    let (code, v) = run_json(&["revert", "--force"], t.path());
    assert_eq!(code, 0);
    assert_eq!(v["report"]["from_markers"], true);
    assert_same_tree(&original, &snapshot(t.path()));
}

/// Each mutated fixture (`fixtures/mutated/NAME.toml`) is refused with the given exit code and message parts; nothing is
/// written. The fixtures aimed at `kvtuner` predate the other groups' files, so they select
/// it alone (`--only kvtuner`); the others run every group.
#[test]
fn mutated_trees_are_refused_and_untouched() {
    const KVTUNER: &[&str] = &["--only", "kvtuner"];
    const ALL: &[&str] = &[];
    let cases: &[(&str, &[&str], i32, &[&str])] = &[
        (
            "anchor-renamed",
            KVTUNER,
            1,
            &[
                "kvtuner/memory-fields",
                "sglang/srt/",
                "class `Memory`",
                "found 0 matches",
            ],
        ),
        (
            "anchor-duplicated",
            KVTUNER,
            1,
            &[
                "class `Memory`",
                "found 2 matches",
                "arg_groups/fields/memory.py:12",
                "mem_cache/legacy_args.py:4",
            ],
        ),
        (
            "odd-indent",
            KVTUNER,
            2,
            &[
                MEMORY,
                "does not compile",
                "IndentationError",
                "nothing was changed",
            ],
        ),
        (
            "missing-import",
            KVTUNER,
            1,
            &[MEMORY, "`Optional`", "found 0 matches"],
        ),
        (
            "newer-release",
            ALL,
            2,
            &["999.0", "newer than the newest release"],
        ),
        (
            "older-release",
            ALL,
            2,
            &["0.5.2", "older than the oldest release", "0.5.3"],
        ),
        (
            "hostpool-fn-renamed",
            ALL,
            1,
            &[
                "hostpool/select-host-pool",
                // Found under a folder (it moved between modules across releases).
                "sglang/srt/mem_cache/: looked for function `get_mha_host_pool_cls`: found 0 matches",
            ],
        ),
        (
            "juicefs-chain-no-file",
            ALL,
            1,
            &[
                "juicefs/builtin-branch",
                FACTORY,
                "if/elif chain mentioning `\"file\"`: found 0 matches",
            ],
        ),
        (
            "juicefs-register-duplicated",
            ALL,
            1,
            &[
                "juicefs/register",
                FACTORY,
                "call `register_backend(\"file\", ...)`: found 2 matches (expected exactly 1) at line 24, line 28",
            ],
        ),
        (
            "juicefs-zero-copy-list-duplicated",
            ALL,
            1,
            &[
                "juicefs/zero-copy",
                CONTROLLER,
                "list literal containing `\"hf3fs\"` in function `attach_storage_backend`: found 2 matches (expected exactly 1) at line 25, line 34",
            ],
        ),
    ];
    for (name, only, want, parts) in cases {
        let t = mutated_fixture(name);
        let before = snapshot(t.path());
        for args in [&["apply"][..], &["apply", "--dry-run"], &["diff"]] {
            let args: Vec<&str> = args.iter().chain(only.iter()).copied().collect();
            let (code, out, err) = run(&args, t.path());
            assert_eq!(code, *want, "{name} {args:?}: {out}{err}");
            for p in *parts {
                assert!(err.contains(p), "{name} {args:?}: `{p}` not in: {err}");
            }
        }
        let mut args = vec!["apply"];
        args.extend_from_slice(only);
        let (code, v) = run_json(&args, t.path());
        assert_eq!(code, *want);
        assert_eq!(v["exit_code"], *want);
        assert!(!v["error"].as_str().unwrap().is_empty());
        assert_same_tree(&before, &snapshot(t.path()));
    }
}

#[test]
fn unsupported_status_says_why() {
    let t = mutated_fixture("older-release");
    let (code, v) = run_json(&["status"], t.path());
    assert_eq!(code, 2);
    assert_eq!(v["report"]["support"]["supported"], false);
    assert_eq!(v["report"]["tree"]["layout"], "dataclass-add-argument");
    assert!(v["report"]["support"]["reason"]
        .as_str()
        .unwrap()
        .contains("older than the oldest release this tool supports (0.5.3)"));
}

#[test]
fn indentation_is_taken_from_the_anchor() {
    let t = mutated_fixture("indent-tabs");
    let original = snapshot(t.path());
    let only = ["--only", "kvtuner"];
    assert_eq!(run(&[&["apply"][..], &only].concat(), t.path()).0, 0);
    let text = fs::read_to_string(t.path().join(MEMORY)).unwrap();
    assert!(text.contains("\n\tenable_kvtuner_hicache: A[\n"), "{text}");
    assert!(text.contains("\n\t# >>> kvtuner-patch:kvtuner/memory-fields sha256="));
    assert_eq!(run(&[&["verify"][..], &only].concat(), t.path()).0, 0);
    assert_eq!(run(&["revert"], t.path()).0, 0);
    assert_same_tree(&original, &snapshot(t.path()));
}

#[test]
fn git_checkout_layout_and_python_folder_are_accepted() {
    let t = copy_tree(&fixture("sglang-0.5.23"), "python");
    let (code, diff, err) = run(&["diff"], t.path());
    assert_eq!(code, 1, "{err}");
    assert!(
        diff.starts_with(&format!("diff --git a/python/{MEMORY} b/python/{MEMORY}\n")),
        "{diff}"
    );
    git_apply(t.path(), &diff, false);
    let (code, v) = run_json(&["status"], &t.path().join("python"));
    assert_eq!(code, 1);
    assert_eq!(v["report"]["tree"]["prefix"], "");
    let (code, _, _) = run(&["apply"], t.path());
    assert_eq!(code, 0);
    assert!(t
        .path()
        .join("python/sglang/.kvtuner-patch/manifest.json")
        .is_file());
}

#[test]
fn verify_python_checks_kvtuner_quant_import() {
    let t = copy_tree(&fixture("sglang-0.5.23"), "");
    assert_eq!(run(&["apply"], t.path()).0, 0);
    let empty = tempfile::tempdir().unwrap();
    let out = cli()
        .args(["--json", "verify", "--python", "python3", "--sglang-root"])
        .arg(t.path())
        .env("PYTHONPATH", empty.path())
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(out.status.code(), Some(1), "{v}");
    assert_eq!(v["report"]["kvtuner_quant"]["ok"], false);
    assert!(v["report"]["problems"][0]
        .as_str()
        .unwrap()
        .contains("kvtuner_quant"));

    let stub = tempfile::tempdir().unwrap();
    fs::write(stub.path().join("kvtuner_quant.py"), "").unwrap();
    let out = cli()
        .args(["verify", "--python", "python3", "--sglang-root"])
        .arg(t.path())
        .env("PYTHONPATH", stub.path())
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn bad_arguments_are_exit_2_with_a_clear_message() {
    let t = copy_tree(&fixture("sglang-0.5.23"), "");
    let (code, _, err) = run(&["apply", "--only", "nope"], t.path());
    assert_eq!(code, 2);
    assert!(
        err.contains("unknown group `nope`") && err.contains("kvtuner"),
        "{err}"
    );
    let (code, _, err) = run(&["apply", "--python", "/nonexistent/python"], t.path());
    assert_eq!(code, 2);
    assert!(err.contains("/nonexistent/python"), "{err}");
    let empty = tempfile::tempdir().unwrap();
    let (code, _, err) = run(&["status"], empty.path());
    assert_eq!(code, 2);
    assert!(err.contains("no SGLang package found"), "{err}");
    assert_same_tree(&snapshot(&fixture("sglang-0.5.23")), &snapshot(t.path()));
}

#[test]
fn help_documents_exit_codes() {
    let out = cli().arg("--help").output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("Exit codes:") && text.contains("2  error"),
        "{text}"
    );
    for cmd in ["apply", "diff", "verify", "revert", "status"] {
        assert!(text.contains(cmd));
        assert!(cli()
            .args([cmd, "--help"])
            .output()
            .unwrap()
            .status
            .success());
    }
}

/// A patched file replaced after apply (say, by an SGLang upgrade) and patched again: revert
/// gives back the *new* original, not the one saved by the first apply.
#[test]
fn reapply_after_the_file_was_replaced_keeps_the_newer_original() {
    let t = copy_tree(&fixture("sglang-0.5.23"), "");
    assert_eq!(run(&["apply", "--only", "kvtuner"], t.path()).0, 0);
    let path = t.path().join(MEMORY);
    let upgraded = fs::read_to_string(fixture("sglang-0.5.23").join(MEMORY))
        .unwrap()
        .replace("] = 16\n", "] = 64\n");
    fs::write(&path, &upgraded).unwrap();
    let upgraded_tree = {
        let mut s = snapshot(t.path());
        s.retain(|k, _| !k.starts_with("sglang/.kvtuner-patch"));
        s
    };
    assert_eq!(
        run(&["status", "--only", "kvtuner"], t.path()).0,
        1,
        "the replaced file is not patched"
    );
    assert_eq!(run(&["apply", "--only", "kvtuner"], t.path()).0, 0);
    assert_eq!(run(&["verify", "--only", "kvtuner"], t.path()).0, 0);
    assert_eq!(run(&["revert"], t.path()).0, 0);
    assert_same_tree(&upgraded_tree, &snapshot(t.path()));
}

/// `juicefs` puts its backend into the package `hostpool` injects: alone on a tree without
/// `hostpool` it is refused (exit 2, saying what to run), nothing written; after `hostpool`
/// it applies on its own, and revert takes both out.
#[test]
fn juicefs_alone_needs_hostpool() {
    let t = copy_tree(&fixture("sglang-0.5.23"), "");
    let original = snapshot(t.path());
    for args in [
        &["apply", "--only", "juicefs"][..],
        &["apply", "--dry-run", "--only", "juicefs"],
        &["diff", "--only", "juicefs"],
    ] {
        let (code, out, err) = run(args, t.path());
        assert_eq!(code, 2, "{args:?}: {out}{err}");
        assert!(
            err.contains(
                "group `juicefs` requires group `hostpool`, which is not applied to this tree"
            ) && err.contains("--only hostpool --only juicefs")
                && err.contains("nothing was changed"),
            "{err}"
        );
    }
    assert_same_tree(&original, &snapshot(t.path()));

    let (code, out, err) = run(
        &["apply", "--only", "hostpool", "--only", "juicefs"],
        t.path(),
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("applied [hostpool, juicefs]: "), "{out}");
    assert_eq!(run(&["revert"], t.path()).0, 0);
    assert_same_tree(&original, &snapshot(t.path()));

    assert_eq!(run(&["apply", "--only", "hostpool"], t.path()).0, 0);
    let (code, out, err) = run(&["apply", "--only", "juicefs"], t.path());
    assert_eq!(code, 0, "{err}");
    let backend = injected_files_under("patches/kvtuner_hicache/juicefs");
    assert_eq!(
        out.trim(),
        format!("applied [juicefs]: {MEMORY}, {CONTROLLER}, {backend}, {FACTORY}")
    );
    let (code, v) = run_json(
        &["status", "--only", "hostpool", "--only", "juicefs"],
        t.path(),
    );
    assert_eq!(code, 0, "{v}");
    assert_eq!(run(&["revert"], t.path()).0, 0);
    assert_same_tree(&original, &snapshot(t.path()));
}

/// The patched fixture, run: the host pool chooser falls through to the stock class without
/// the flag, the factory knows `juicefs` and builds it like the other third-party stores,
/// the cache controller gives `juicefs` the zero-copy page path (and still not `file`),
/// and the startup hook ends start-up (one `SystemExit` line) on the flag without
/// `--enable-hierarchical-cache`.
#[test]
fn patched_fixture_runs() {
    let t = copy_tree(&fixture("sglang-0.5.23"), "");
    assert_eq!(run(&["apply"], t.path()).0, 0);
    let out = python_in(
        t.path(),
        r#"
from types import SimpleNamespace as NS
from sglang.srt.mem_cache.pool_host.mha import FixtureHostPool, get_mha_host_pool_cls
print(get_mha_host_pool_cls(NS(scales=None, head_dim=8, v_head_dim=8)) is FixtureHostPool)
from sglang.srt.mem_cache.storage.backend_factory import StorageBackendFactory as F
print(F._registry["juicefs"])
class Store:
    def __init__(self, *args):
        self.args = args
print(F._create_builtin_backend("juicefs", Store, "config", "pool").args)
from sglang.srt.managers.cache_controller import HiCacheController
c = HiCacheController(page_size=64)
for backend in ("juicefs", "file"):
    c.attach_storage_backend(backend)
    print(backend, c.page_get_func([]), c.page_set_func([]))
from sglang.srt.arg_groups.hicache_hook import handle_hicache_ratio_default as hook
args = NS(hicache_ratio=None, enable_kvtuner_hicache=False)
hook(args)
print(args.hicache_ratio)
try:
    hook(NS(hicache_ratio=None, enable_kvtuner_hicache=True))
except SystemExit as e:
    print("refused:", e)
"#,
    )
    .unwrap();
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "True", "{out}");
    assert_eq!(
        lines[1],
        "{'module_path': 'sglang.srt.mem_cache.kvtuner_hicache.juicefs', 'class_name': 'JuiceFSStorage'}"
    );
    assert_eq!(lines[2], "('config', 'pool')");
    assert_eq!(lines[3], "juicefs zero-copy zero-copy");
    assert_eq!(lines[4], "file generic generic");
    assert_eq!(lines[5], "2.0");
    assert!(
        lines[6].starts_with("refused: error: --enable-kvtuner-hicache")
            && lines[6].contains("--enable-hierarchical-cache"),
        "{out}"
    );
}
