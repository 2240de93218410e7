//! The engine on real SGLang release trees (0.5.23, and 0.5.19 for the older server-args and
//! host-pool shapes; the wheels, downloaded once and cached by `scripts/sglang-wheel.sh`). No
//! network means these tests FAIL, loudly: they are never skipped.

mod common;
use common::*;
use std::fs;
use std::time::Instant;

const VERSION: &str = "0.5.23";

#[test]
fn real_0_5_23_apply_verify_revert() {
    let t = copy_tree(&release_tree(VERSION), "");
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
    let ids: Vec<&str> = r["groups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["kvtuner", "hostpool", "juicefs"]);
    for a in r["anchors"].as_array().unwrap() {
        assert_eq!(a["found"], true, "{a}");
    }

    // `juicefs` alone needs `hostpool` first.
    let (code, _, err) = run(&["apply", "--only", "juicefs"], root);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("requires group `hostpool`"), "{err}");
    assert_same_tree(&original, &snapshot(root));

    // The diff is stable (snapshot; injected file bodies elided), and git accepts it.
    let (code, diff, err) = run(&["diff"], root);
    assert_eq!(code, 1, "{err}");
    insta::assert_snapshot!("real_0_5_23_diff", elide_new_files(&diff));
    git_apply(root, &diff, false);
    fs::remove_dir_all(root.join(".git")).unwrap();
    assert_same_tree(&original, &snapshot(root));

    let start = Instant::now();
    let (code, out, err) = run(&["apply"], root);
    eprintln!("apply on the real tree: {:?}", start.elapsed());
    assert_eq!(code, 0, "{err}");
    let injected = injected_package_files();
    assert_eq!(
        out.trim(),
        format!(
            "applied [kvtuner, hostpool, juicefs]: {MEMORY}, {HOOK}, {CONTROLLER}, {injected}, {MHA}, {MLA}, {FACTORY}"
        )
    );
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

    // `juicefs` joins the backends `attach_storage_backend` gives the zero-copy page path:
    // the list it was added to is the one holding `"hf3fs"`, in that method.
    let text = fs::read_to_string(root.join(CONTROLLER)).unwrap();
    let method_at = text.find("    def attach_storage_backend(").unwrap();
    let hf3fs_at = method_at + text[method_at..].find("\"hf3fs\",\n").unwrap();
    let juicefs_at = text
        .find("                    \"juicefs\",\n                    # <<< kvtuner-patch:juicefs/zero-copy\n                ]\n")
        .unwrap();
    assert!(hf3fs_at < juicefs_at);
    assert!(text[hf3fs_at..juicefs_at].contains("\"seaweedfs\","));
    assert!(!text[hf3fs_at..juicefs_at].contains(']'));
    assert!(text[juicefs_at..].contains("self.page_get_func = self._page_get_zero_copy"));

    let start = Instant::now();
    let (code, v) = run_json(&["verify"], root);
    eprintln!("verify on the real tree: {:?}", start.elapsed());
    assert_eq!(code, 0, "{v}");
    let files = v["report"]["files"].as_array().unwrap();
    // The six SGLang files the groups edit, and every injected module.
    assert_eq!(files.len(), 6 + injected.split(", ").count(), "{v}");
    for f in files {
        assert!(f["parses"] == true && f["compiles"] == true, "{f}");
    }

    assert_reapply_is_noop_and_revert_restores(root, &[], &original);
}

/// 0.5.19 (`namespaced-server-args`): the host pool is chosen by
/// `get_mha_host_pool_cls(device_pool)`, the kvtuner check goes first in
/// `ServerArgs.check_server_args`, `juicefs` is a choice of the `ServerArgs` field and its
/// zero-copy choice an `elif` of the `if` testing the one-line list.
#[test]
fn real_0_5_19_apply_verify_revert() {
    const SERVER_ARGS: &str = "sglang/srt/server_args.py";
    let t = copy_tree(&release_tree("0.5.19"), "");
    let root = t.path();
    let original = snapshot(root);

    let (code, v) = run_json(&["status"], root);
    assert_eq!(code, 1, "{v}");
    let r = &v["report"];
    assert_eq!(r["tree"]["version"], "0.5.19");
    assert_eq!(r["tree"]["era"], "namespaced-server-args");
    assert_eq!(r["support"]["supported"], true, "{v}");
    for a in r["anchors"].as_array().unwrap() {
        assert_eq!(a["found"], true, "{a}");
    }

    let (code, diff, err) = run(&["diff"], root);
    assert_eq!(code, 1, "{err}");
    insta::assert_snapshot!("real_0_5_19_diff", elide_new_files(&diff));
    git_apply(root, &diff, false);
    fs::remove_dir_all(root.join(".git")).unwrap();

    let (code, out, err) = run(&["apply"], root);
    assert_eq!(code, 0, "{err}");
    let injected = injected_package_files();
    assert_eq!(
        out.trim(),
        format!("applied [kvtuner, hostpool, juicefs]: {CONTROLLER}, {injected}, {MHA}, {MLA}, {FACTORY}, {SERVER_ARGS}")
    );
    let text = fs::read_to_string(root.join(SERVER_ARGS)).unwrap();
    assert!(text.contains(
        "    def check_server_args(self):\n        # >>> kvtuner-patch:hostpool/check-server-args sha256="
    ));
    assert!(text.contains("        _kvtuner_check_server_args(self)\n        # <<< kvtuner-patch:hostpool/check-server-args\n        from sglang.srt.arg_groups.validation_hook import check_server_args\n"));
    let text = fs::read_to_string(root.join(MHA)).unwrap();
    assert!(text.contains("    _kvtuner_cls = select_mha_host_pool_cls(device_pool, None)\n"));
    let text = fs::read_to_string(root.join(CONTROLLER)).unwrap();
    let list_at = text
        .find("in [\"hf3fs\", \"mooncake\", \"eic\", \"nixl\", \"simm\", \"mori\"]")
        .unwrap();
    let branch_at = text
        .find("            elif self.storage_backend_type == \"juicefs\":\n                self.page_get_func = self._page_get_zero_copy\n                self.page_set_func = self._page_set_zero_copy\n            # <<< kvtuner-patch:juicefs/zero-copy\n")
        .unwrap();
    assert!(list_at < branch_at);

    let (code, v) = run_json(&["verify"], root);
    assert_eq!(code, 0, "{v}");
    for f in v["report"]["files"].as_array().unwrap() {
        assert!(f["parses"] == true && f["compiles"] == true, "{f}");
    }
    assert_reapply_is_noop_and_revert_restores(root, &[], &original);
}
