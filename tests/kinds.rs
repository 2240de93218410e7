//! The edit kinds the later groups need (inject a file, a list item, an elif branch, a
//! statement after a call, a block after a field/method), exercised through the library on a
//! small hand-written tree shaped like the places the `hostpool` and `juicefs` groups touch.

mod common;
use common::*;
use kvtuner_patch::engine::anchor::{self, DriftReason, Lookup, PatchState};
use kvtuner_patch::engine::changeset::ChangeSet;
use kvtuner_patch::engine::python::Python;
use kvtuner_patch::engine::sources::Sources;
use kvtuner_patch::patch::{
    BodyAt, ClassRef, FileRef, FnRef, Group, ListRef, Patch, PatchKind, Snippet,
};
use kvtuner_patch::sglang_tree::SglangTree;
use std::fs;

const FACTORY: &str = r#"class BackendFactory:
    @staticmethod
    def build(name, config):
        if name == "file":
            return ("file", config)
        elif name == "nixl":
            return ("nixl", config)
        else:
            raise ValueError("Unknown built-in backend")


register_backend("file", "pkg.file_store", "FileStore")
register_backend("nixl", "pkg.nixl_store", "NixlStore")
"#;

const ARGS: &str = r#"from typing import Annotated as A


class Args:
    backend: A[
        str,
        dict(
            choices=[
                "file",
                "nixl"
            ],
        ),
    ] = "file"

    def check(self):
        return True
"#;

const STORE_PY: &str = "class ToyStore:\n    pass\n";
const EXTRA_PY: &str =
    "class Extra:\n    \"\"\"Body lifted into Args.\"\"\"\n\n    extra_flag: bool = False\n";

fn toy_tree() -> tempfile::TempDir {
    let t = tempfile::tempdir().unwrap();
    let srt = t.path().join("sglang/srt");
    fs::create_dir_all(srt.join("storage")).unwrap();
    fs::write(
        t.path().join("sglang/version.py"),
        "__version__ = \"0.5.23\"\n",
    )
    .unwrap();
    fs::write(srt.join("storage/factory.py"), FACTORY).unwrap();
    fs::write(srt.join("args.py"), ARGS).unwrap();
    t
}

fn toy_group() -> Group {
    let args = ClassRef {
        name: "Args",
        under: "sglang/srt",
    };
    Group {
        id: "toy",
        summary: "every edit kind",
        patches: vec![
            Patch {
                id: "store-file",
                what: "inject a backend module",
                kind: PatchKind::InjectFile {
                    dest: "sglang/srt/storage/toy_store.py",
                    source: STORE_PY,
                },
            },
            Patch {
                id: "choice",
                what: "list item",
                kind: PatchKind::ListItem {
                    list: ListRef::FieldKeyword {
                        class: args,
                        field: "backend",
                        keyword: "choices",
                    },
                    item: "\"toy\"",
                },
            },
            Patch {
                id: "branch",
                what: "elif branch",
                kind: PatchKind::ElifBranch {
                    function: FnRef::Method {
                        class: ClassRef {
                            name: "BackendFactory",
                            under: "sglang/srt",
                        },
                        name: "build",
                    },
                    chain_has: "\"file\"",
                    condition: "name == \"toy\"",
                    body: Snippet::Text(
                        "from sglang.srt.storage.toy_store import ToyStore\nreturn ToyStore()\n",
                    ),
                },
            },
            Patch {
                id: "register",
                what: "statement after a call",
                kind: PatchKind::AfterCall {
                    file: FileRef::Path("sglang/srt/storage/factory.py"),
                    callee: "register_backend",
                    first_arg: Some("nixl"),
                    block: Snippet::Text(
                        "register_backend(\"toy\", \"sglang.srt.storage.toy_store\", \"ToyStore\")",
                    ),
                },
            },
            Patch {
                id: "field",
                what: "block after a field",
                kind: PatchKind::ClassBody {
                    class: args,
                    at: BodyAt::AfterField("backend"),
                    block: Snippet::ClassBodyOf {
                        source: EXTRA_PY,
                        source_path: "extra.py",
                        class: "Extra",
                    },
                    needs: &[],
                },
            },
            Patch {
                id: "method",
                what: "block after a method",
                kind: PatchKind::ClassBody {
                    class: args,
                    at: BodyAt::AfterMethod("check"),
                    block: Snippet::Text("def is_toy(self):\n    return self.backend == \"toy\"\n"),
                    needs: &[],
                },
            },
        ],
    }
}

fn states(tree: &SglangTree, g: &Group) -> Vec<PatchState> {
    let mut src = Sources::new(tree);
    g.patches
        .iter()
        .map(|p| {
            anchor::locate(&mut src, g, p)
                .and_then(Lookup::found)
                .unwrap()
                .state
        })
        .collect()
}

fn change_set_of(tree: &SglangTree, g: &Group) -> ChangeSet {
    let mut src = Sources::new(tree);
    let planned = g
        .patches
        .iter()
        .map(|p| {
            anchor::locate(&mut src, g, p)
                .and_then(Lookup::found)
                .map(|l| l.edit)
                .unwrap()
        })
        .collect();
    ChangeSet::build(planned, &mut src).unwrap()
}

/// A fresh tree through the whole write path: nothing applied yet, the change set validates (parse
/// and compile), its diff matches the snapshot `name` and `git apply` accepts it, then it is
/// written.
fn check_snapshot_and_commit(tree: &SglangTree, g: &Group, name: &str) {
    assert!(states(tree, g).iter().all(|s| *s == PatchState::NotApplied));
    let changes = change_set_of(tree, g);
    changes.validate(&Python::pick(None)).unwrap();
    let diff = changes.diff(tree);
    insta::assert_snapshot!(name, diff);
    git_apply(copy_tree(&tree.root, "").path(), &diff, false);
    changes.commit(tree, &["toy"], &changes.files()).unwrap();
}

#[test]
fn every_edit_kind_plans_validates_applies_and_is_detected() {
    let t = toy_tree();
    let original = snapshot(t.path());
    let tree = SglangTree::resolve(t.path()).unwrap();
    let g = toy_group();
    check_snapshot_and_commit(&tree, &g, "toy_every_kind_diff");
    assert!(
        states(&tree, &g).iter().all(|s| *s == PatchState::Applied),
        "{:?}",
        states(&tree, &g)
    );

    // The trailing comma the list item needed is outside the markers: only the manifest can
    // undo it, which is why revert uses the manifest and not marker removal.
    let r = kvtuner_patch::commands::revert(t.path(), false).unwrap();
    assert_eq!(
        r.removed,
        vec!["sglang/srt/storage/toy_store.py".to_string()]
    );
    assert_same_tree(&original, &snapshot(t.path()));
}

#[test]
fn overlapping_patches_are_refused() {
    let t = toy_tree();
    let tree = SglangTree::resolve(t.path()).unwrap();
    let mut g = toy_group();
    let twice = g
        .patches
        .iter()
        .find(|p| p.id == "register")
        .unwrap()
        .clone();
    g.patches = vec![
        twice.clone(),
        Patch {
            id: "register-again",
            ..twice
        },
    ];
    let mut src = Sources::new(&tree);
    let planned = g
        .patches
        .iter()
        .map(|p| {
            anchor::locate(&mut src, &g, p)
                .and_then(Lookup::found)
                .map(|l| l.edit)
                .unwrap()
        })
        .collect();
    let err = ChangeSet::build(planned, &mut src).unwrap_err().to_string();
    assert!(
        err.contains("factory.py") && err.contains("overlapping"),
        "{err}"
    );
}

#[test]
fn hand_edited_injected_file_is_drift() {
    let t = toy_tree();
    let tree = SglangTree::resolve(t.path()).unwrap();
    let mut g = toy_group();
    g.patches.retain(|p| p.id == "store-file");
    let changes = change_set_of(&tree, &g);
    changes.commit(&tree, &["toy"], &changes.files()).unwrap();
    let path = t.path().join("sglang/srt/storage/toy_store.py");
    let text = fs::read_to_string(&path).unwrap();
    assert!(text.starts_with("# kvtuner-patch:toy/store-file sha256="));
    fs::write(&path, text.replace("pass", "x = 1")).unwrap();
    match &states(&tree, &g)[0] {
        PatchState::Drifted(d) => assert!(
            matches!(d, DriftReason::InjectedFileEdited { .. })
                && d.to_string().contains("edited by hand"),
            "{d}"
        ),
        s => panic!("{s:?}"),
    }
}

#[test]
fn elif_chain_and_call_anchors_report_counts() {
    let t = toy_tree();
    // A second registration of the same name makes the call anchor ambiguous.
    let f = t.path().join("sglang/srt/storage/factory.py");
    fs::write(
        &f,
        format!("{FACTORY}register_backend(\"nixl\", \"other\", \"Other\")\n"),
    )
    .unwrap();
    let tree = SglangTree::resolve(t.path()).unwrap();
    let g = toy_group();
    let mut src = Sources::new(&tree);
    let reg = g.patches.iter().find(|p| p.id == "register").unwrap();
    let err = anchor::locate(&mut src, &g, reg)
        .and_then(Lookup::found)
        .map(|l| l.edit)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("toy/register: sglang/srt/storage/factory.py: looked for call `register_backend(\"nixl\", ...)`: found 2 matches"),
        "{err}"
    );
}

#[test]
fn list_item_in_an_add_argument_call() {
    let t = toy_tree();
    let cli = "def add_cli_args(parser):\n    parser.add_argument(\n        \"--backend\",\n        choices=[\n            \"file\",\n        ],\n    )\n";
    fs::write(t.path().join("sglang/srt/cli.py"), cli).unwrap();
    let tree = SglangTree::resolve(t.path()).unwrap();
    let g = Group {
        id: "toy",
        summary: "",
        patches: vec![Patch {
            id: "choice",
            what: "",
            kind: PatchKind::ListItem {
                list: ListRef::CallKeyword {
                    file: FileRef::Path("sglang/srt/cli.py"),
                    callee: "add_argument",
                    first_arg: "--backend",
                    keyword: "choices",
                },
                item: "\"toy\"",
            },
        }],
    };
    let changes = change_set_of(&tree, &g);
    changes.validate(&Python::pick(None)).unwrap();
    assert!(changes.changes[0]
        .after
        .contains("            \"file\",\n            # >>> kvtuner-patch:toy/choice sha256="));
    assert!(changes.changes[0].after.contains(
        "            \"toy\",\n            # <<< kvtuner-patch:toy/choice\n        ],\n"
    ));
    changes.commit(&tree, &["toy"], &changes.files()).unwrap();
    assert_eq!(states(&tree, &g), vec![PatchState::Applied]);
}

/// A controller whose method tests membership in an unnamed list; decoys hold `"fast"` in a
/// list in another method and at module level, and in a tuple and a set in the method.
const CONTROLLER: &str = r#"FAST = ["fast"]


class Controller:
    def attach(self, kind):
        self.kind = kind
        self.modes = ("fast", {"fast"})
        if self.kind in [
            "fast",
            "quick",  # already zero-copy
        ]:
            self.path = "zero-copy"

    def describe(self):
        return ["fast"]
"#;

fn controller_group() -> Group {
    Group {
        id: "toy",
        summary: "",
        patches: vec![Patch {
            id: "zero-copy",
            what: "",
            kind: PatchKind::ListItem {
                list: ListRef::ContainingItem {
                    function: FnRef::Method {
                        class: ClassRef {
                            name: "Controller",
                            under: "sglang/srt",
                        },
                        name: "attach",
                    },
                    has_item: "\"fast\"",
                },
                item: "\"toy\"",
            },
        }],
    }
}

fn controller_tree(text: &str) -> tempfile::TempDir {
    let t = toy_tree();
    fs::write(t.path().join("sglang/srt/controller.py"), text).unwrap();
    t
}

#[test]
fn list_item_in_the_list_of_a_method_holding_an_item() {
    let t = controller_tree(CONTROLLER);
    let original = snapshot(t.path());
    let tree = SglangTree::resolve(t.path()).unwrap();
    let g = controller_group();
    assert_eq!(states(&tree, &g), vec![PatchState::NotApplied]);
    let changes = change_set_of(&tree, &g);
    changes.validate(&Python::pick(None)).unwrap();
    let after = &changes.changes[0].after;
    assert!(
        after.contains("            \"quick\",  # already zero-copy\n            # >>> kvtuner-patch:toy/zero-copy sha256=")
            && after.contains("            \"toy\",\n            # <<< kvtuner-patch:toy/zero-copy\n        ]:\n"),
        "{after}"
    );
    // Only the one list changed (the decoys are byte-for-byte as before).
    assert_eq!(after.matches("\"toy\"").count(), 1);
    assert!(
        after.starts_with("FAST = [\"fast\"]\n") && after.ends_with("        return [\"fast\"]\n")
    );
    changes.commit(&tree, &["toy"], &changes.files()).unwrap();
    assert_eq!(states(&tree, &g), vec![PatchState::Applied]);

    // The item without its markers is drift, not "applied".
    let path = t.path().join("sglang/srt/controller.py");
    let applied = fs::read_to_string(&path).unwrap();
    let unmarked: String = applied
        .lines()
        .filter(|l| !l.contains("kvtuner-patch:"))
        .map(|l| format!("{l}\n"))
        .collect();
    fs::write(&path, unmarked).unwrap();
    match &states(&tree, &g)[0] {
        PatchState::Drifted(d) => assert!(
            matches!(d, DriftReason::CodeWithoutMarkers { .. })
                && d.to_string().contains("without kvtuner-patch markers"),
            "{d}"
        ),
        s => panic!("{s:?}"),
    }
    fs::write(&path, &applied).unwrap();
    kvtuner_patch::commands::revert(t.path(), false).unwrap();
    assert_same_tree(&original, &snapshot(t.path()));
}

/// No list in the method holding the item, or two: refused with the count (and where), for
/// planning and for detection alike.
#[test]
fn list_holding_an_item_must_be_unique_in_its_method() {
    let g = controller_group();
    let cases = [
        (
            CONTROLLER.replace("            \"fast\",\n", ""),
            "toy/zero-copy: sglang/srt/controller.py: looked for list literal containing `\"fast\"` in function `attach`: found 0 matches",
        ),
        (
            CONTROLLER.replace("(\"fast\", {\"fast\"})", "[\"fast\", {\"fast\"}]"),
            "toy/zero-copy: sglang/srt/controller.py: looked for list literal containing `\"fast\"` in function `attach`: found 2 matches (expected exactly 1) at line 7, line 8",
        ),
    ];
    for (text, want) in cases {
        let t = controller_tree(&text);
        let tree = SglangTree::resolve(t.path()).unwrap();
        let err = plan_err(&tree, &g, "zero-copy");
        assert!(err.contains(want), "`{want}` not in: {err}");
        let mut src = Sources::new(&tree);
        let err = anchor::locate(&mut src, &g, &g.patches[0])
            .and_then(Lookup::found)
            .unwrap_err()
            .to_string();
        assert!(err.contains(want), "`{want}` not in: {err}");
    }
}

// ---------------------------------------------------------------------------------------------
// Function-scoped kinds: `FunctionStart` and `AfterAssign`
// ---------------------------------------------------------------------------------------------

/// Two releases' shapes of the same chooser: the parameter was renamed, and one has a docstring.
const CHOOSER_NEW: &str = "def choose(buffer_info) -> type:\n    if buffer_info.wide:\n        return Wide\n    return Narrow\n";
const CHOOSER_OLD: &str =
    "def choose(device_pool):\n    \"\"\"Pick the pool class.\"\"\"\n    return Narrow\n";
const HOOK: &str = "def view(args):\n    return args\n\n\nclass Hooks:\n    @staticmethod\n    def on_start(args):\n        \"\"\"Startup.\"\"\"\n        cfg = view(args)\n        if cfg.ratio is None:\n            args.ratio = 2.0\n";

fn fn_tree(chooser: &str, hook: &str) -> tempfile::TempDir {
    let t = tempfile::tempdir().unwrap();
    let srt = t.path().join("sglang/srt");
    fs::create_dir_all(&srt).unwrap();
    fs::write(
        t.path().join("sglang/version.py"),
        "__version__ = \"0.5.23\"\n",
    )
    .unwrap();
    fs::write(srt.join("chooser.py"), chooser).unwrap();
    fs::write(srt.join("hooks.py"), hook).unwrap();
    t
}

fn fn_group() -> Group {
    Group {
        id: "toy",
        summary: "function-scoped kinds",
        patches: vec![
            Patch {
                id: "start",
                what: "first statements of a module function",
                kind: PatchKind::FunctionStart {
                    function: FnRef::Module {
                        file: "sglang/srt/chooser.py",
                        name: "choose",
                    },
                    block: Snippet::Text(
                        "picked = pick({first_param})\nif picked is not None:\n    return picked\n",
                    ),
                },
            },
            Patch {
                id: "after-cfg",
                what: "after an assignment in a method",
                kind: PatchKind::AfterAssign {
                    function: FnRef::Method {
                        class: ClassRef {
                            name: "Hooks",
                            under: "sglang/srt",
                        },
                        name: "on_start",
                    },
                    target: "cfg",
                    block: Snippet::Text("check(cfg)\n"),
                },
            },
        ],
    }
}

fn plan_err(tree: &SglangTree, g: &Group, id: &str) -> String {
    let mut src = Sources::new(tree);
    let p = g.patches.iter().find(|p| p.id == id).unwrap();
    anchor::locate(&mut src, g, p)
        .and_then(Lookup::found)
        .map(|l| l.edit)
        .unwrap_err()
        .to_string()
}

#[test]
fn function_start_and_after_assign_apply_detect_and_revert() {
    let t = fn_tree(CHOOSER_NEW, HOOK);
    let original = snapshot(t.path());
    let tree = SglangTree::resolve(t.path()).unwrap();
    let g = fn_group();
    check_snapshot_and_commit(&tree, &g, "toy_function_kinds_diff");
    assert_eq!(states(&tree, &g), vec![PatchState::Applied; 2]);
    let chooser = fs::read_to_string(t.path().join("sglang/srt/chooser.py")).unwrap();
    assert!(
        chooser.starts_with("def choose(buffer_info) -> type:\n    # >>> kvtuner-patch:toy/start sha256=")
            && chooser.contains("    picked = pick(buffer_info)\n    if picked is not None:\n        return picked\n    # <<< kvtuner-patch:toy/start\n    if buffer_info.wide:\n"),
        "{chooser}"
    );
    let hooks = fs::read_to_string(t.path().join("sglang/srt/hooks.py")).unwrap();
    assert!(
        hooks.contains("        cfg = view(args)\n        # >>> kvtuner-patch:toy/after-cfg sha256=")
            && hooks.contains("        check(cfg)\n        # <<< kvtuner-patch:toy/after-cfg\n        if cfg.ratio is None:\n"),
        "{hooks}"
    );

    // A hand edit inside a block is drift; revert gives the original bytes back.
    let path = t.path().join("sglang/srt/hooks.py");
    fs::write(
        &path,
        hooks.replace("check(cfg)", "check(cfg, strict=True)"),
    )
    .unwrap();
    match &states(&tree, &g)[1] {
        PatchState::Drifted(d) => assert!(d.to_string().contains("toy/after-cfg"), "{d}"),
        s => panic!("{s:?}"),
    }
    fs::write(&path, &hooks).unwrap();
    kvtuner_patch::commands::revert(t.path(), false).unwrap();
    assert_same_tree(&original, &snapshot(t.path()));
}

/// The older shape: the block names the release's own parameter, and goes after the docstring.
#[test]
fn function_start_uses_the_real_first_parameter_and_keeps_the_docstring_first() {
    let t = fn_tree(CHOOSER_OLD, HOOK);
    let tree = SglangTree::resolve(t.path()).unwrap();
    let g = fn_group();
    let changes = change_set_of(&tree, &g);
    changes.validate(&Python::pick(None)).unwrap();
    let after = &changes
        .changes
        .iter()
        .find(|c| c.rel == "sglang/srt/chooser.py")
        .unwrap()
        .after;
    assert!(
        after.starts_with("def choose(device_pool):\n    \"\"\"Pick the pool class.\"\"\"\n    # >>> kvtuner-patch:toy/start")
            && after.contains("    picked = pick(device_pool)\n"),
        "{after}"
    );
    changes.commit(&tree, &["toy"], &changes.files()).unwrap();
    assert_eq!(states(&tree, &g), vec![PatchState::Applied; 2]);
}

/// Renamed function, no first parameter, two assignments, no assignment, a body on the
/// `def` line: each refused, naming what was looked for and how often it was found.
#[test]
fn function_scoped_anchors_report_what_they_did_not_find() {
    let g = fn_group();
    let cases: &[(&str, &str, &str, &str)] = &[
        (
            "def pick_class(buffer_info):\n    return Narrow\n",
            HOOK,
            "start",
            "toy/start: sglang/srt/chooser.py: looked for function `choose`: found 0 matches",
        ),
        (
            "def choose(*pools):\n    return Narrow\n",
            HOOK,
            "start",
            "toy/start: sglang/srt/chooser.py: looked for a named first parameter of function `choose`: found 0 matches",
        ),
        (
            "def choose(buffer_info): return Narrow\n",
            HOOK,
            "start",
            "sglang/srt/chooser.py:1: the body of `choose` is on its `def` line",
        ),
        (
            CHOOSER_NEW,
            &HOOK.replace("        cfg = view(args)\n", "        cfg = view(args)\n        cfg = view(cfg)\n"),
            "after-cfg",
            "toy/after-cfg: sglang/srt/hooks.py: looked for assignment `cfg = ...` in function `on_start`: found 2 matches (expected exactly 1) at line 9, line 10",
        ),
        (
            CHOOSER_NEW,
            &HOOK.replace("cfg", "conf"),
            "after-cfg",
            "looked for assignment `cfg = ...` in function `on_start`: found 0 matches",
        ),
    ];
    for (chooser, hook, id, want) in cases {
        let t = fn_tree(chooser, hook);
        let tree = SglangTree::resolve(t.path()).unwrap();
        let err = plan_err(&tree, &g, id);
        assert!(err.contains(want), "{id}: `{want}` not in: {err}");
    }
}
