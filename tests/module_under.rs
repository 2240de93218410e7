//! `FnRef::ModuleUnder`: a module-level function found in whichever file below a folder defines
//! it (upstream moved `get_mha_host_pool_cls` from `memory_pool_host.py` to `pool_host/mha.py`),
//! exactly once, and the patch lands in that file.

use kvtuner_patch::engine::anchor::{self, Lookup, PatchState};
use kvtuner_patch::engine::changeset::ChangeSet;
use kvtuner_patch::engine::python::Python;
use kvtuner_patch::engine::sources::Sources;
use kvtuner_patch::patch::{FnRef, Group, Patch, PatchKind, Snippet};
use kvtuner_patch::sglang_tree::SglangTree;
use std::fs;

const CHOOSER: &str = "def choose(device_pool):\n    return Narrow\n";
/// Mentions `def choose` but defines no module-level `choose`: a method and a string.
const DECOY: &str =
    "class Pools:\n    def choose(self):\n        return 1\n\n\nDOC = \"def choose(x)\"\n";

/// `files`: (path below `sglang/srt/mem`, text).
fn tree(files: &[(&str, &str)]) -> tempfile::TempDir {
    let t = tempfile::tempdir().unwrap();
    fs::create_dir_all(t.path().join("sglang/srt/mem/pool")).unwrap();
    fs::write(
        t.path().join("sglang/version.py"),
        "__version__ = \"0.5.23\"\n",
    )
    .unwrap();
    for (rel, text) in files {
        fs::write(t.path().join("sglang/srt/mem").join(rel), text).unwrap();
    }
    t
}

fn group() -> Group {
    Group {
        id: "toy",
        summary: "a function found below a folder",
        patches: vec![Patch {
            id: "start",
            what: "first statements of the chooser",
            kind: PatchKind::FunctionStart {
                function: FnRef::ModuleUnder {
                    under: "sglang/srt/mem",
                    name: "choose",
                },
                block: Snippet::Text(
                    "picked = pick({first_param})\nif picked is not None:\n    return picked\n",
                ),
            },
        }],
    }
}

fn change_set(tree: &SglangTree) -> anyhow::Result<ChangeSet> {
    let mut src = Sources::new(tree);
    let g = group();
    let planned = vec![anchor::locate(&mut src, &g, &g.patches[0])
        .and_then(Lookup::found)
        .map(|l| l.edit)?];
    ChangeSet::build(planned, &mut src)
}

#[test]
fn found_in_either_file_and_patched_there() {
    for rel in ["old.py", "pool/new.py"] {
        let t = tree(&[(rel, CHOOSER), ("decoy.py", DECOY)]);
        let tree = SglangTree::resolve(t.path()).unwrap();
        let p = change_set(&tree).unwrap();
        p.validate(&Python::pick(None)).unwrap();
        let changed: Vec<&str> = p.changes.iter().map(|c| c.rel.as_str()).collect();
        assert_eq!(changed, [format!("sglang/srt/mem/{rel}")]);
        p.commit(&tree, &["toy"], &p.files()).unwrap();
        let text = fs::read_to_string(t.path().join("sglang/srt/mem").join(rel)).unwrap();
        assert!(text.contains("    picked = pick(device_pool)\n"), "{text}");
        let g = group();
        let mut src = Sources::new(&tree);
        assert_eq!(
            anchor::locate(&mut src, &g, &g.patches[0])
                .and_then(Lookup::found)
                .unwrap()
                .state,
            PatchState::Applied
        );
    }
}

#[test]
fn none_or_two_definitions_are_drift_naming_the_folder() {
    let t = tree(&[("decoy.py", DECOY)]);
    let err = change_set(&SglangTree::resolve(t.path()).unwrap())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("toy/start: sglang/srt/mem/: looked for function `choose`: found 0 matches"),
        "{err}"
    );
    let t = tree(&[("old.py", CHOOSER), ("pool/new.py", CHOOSER)]);
    let err = change_set(&SglangTree::resolve(t.path()).unwrap())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("found 2 matches")
            && err.contains("sglang/srt/mem/old.py:1")
            && err.contains("sglang/srt/mem/pool/new.py:1"),
        "{err}"
    );
}
