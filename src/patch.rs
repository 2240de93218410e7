//! The vocabulary patch groups are written in: plain data, no logic.
//!
//! A [`Group`] is a named, independently applicable set of [`Patch`]es (`kvtuner`,
//! `hostpool`, `juicefs`). Each patch says *where* (an anchor found by structure, see
//! `engine/resolve.rs`) and *what* (a [`Snippet`], usually the body of a class in a real `.py`
//! file under `patches/`, embedded with `include_str!`). Lookup, detection, planning,
//! rendering and drift reporting are generic over [`PatchKind`] (in `engine/`), so adding a
//! group means writing data (see `groups/mod.rs`).

/// A class found by name in any `.py` file below `under` (a package-relative folder such as
/// `sglang/srt`), so it is found again after upstream moves it between modules.
#[derive(Debug, Clone, Copy)]
pub struct ClassRef {
    pub name: &'static str,
    pub under: &'static str,
}

/// A file an anchor is looked up in.
#[derive(Debug, Clone, Copy)]
pub enum FileRef {
    /// This package-relative path (where no structure names the file).
    Path(&'static str),
    /// The file that defines the class, found by structure: a release that moves the class to
    /// another module needs no new form.
    OfClass(ClassRef),
}

/// Where in a class body a block goes.
#[derive(Debug, Clone, Copy)]
pub enum BodyAt {
    /// After the last statement of the body.
    End,
    /// After the field declaration `name: T = ...` / `name = ...`.
    AfterField(&'static str),
    /// After the method `def name(...)`.
    AfterMethod(&'static str),
}

/// A list literal that receives an item.
#[derive(Debug, Clone, Copy)]
pub enum ListRef {
    /// `keyword=[...]` inside the declaration of `field` in `class` (e.g. `Arg(choices=[...])`).
    FieldKeyword {
        class: ClassRef,
        field: &'static str,
        keyword: &'static str,
    },
    /// `keyword=[...]` in a call `callee("first_arg", ...)` in `file` (e.g. `add_argument`).
    CallKeyword {
        file: FileRef,
        callee: &'static str,
        first_arg: &'static str,
        keyword: &'static str,
    },
    /// The one list literal anywhere inside `function` that has `has_item` (Python source,
    /// e.g. `"hf3fs"`) among its items, such as the `x in ["hf3fs", ...]` test that picks the
    /// zero-copy storage path: a list with no name of its own is known by what it holds.
    ContainingItem {
        function: FnRef,
        has_item: &'static str,
    },
}

/// A function: the one holding an if/elif chain, a list, a block.
#[derive(Debug, Clone, Copy)]
pub enum FnRef {
    /// Module-level `def name` in `file` (prefer [`FnRef::ModuleUnder`] where the name is
    /// unique under a folder: it survives the function moving between modules).
    Module {
        file: &'static str,
        name: &'static str,
    },
    /// The one module-level `def name` in any `.py` file below `under`, for a function
    /// upstream moved between modules (`get_mha_host_pool_cls`: `memory_pool_host.py`, then
    /// `pool_host/mha.py`).
    ModuleUnder {
        under: &'static str,
        name: &'static str,
    },
    /// `def name` inside a class found by [`ClassRef`].
    Method { class: ClassRef, name: &'static str },
    /// The first of `names` that the class defines, for code upstream moved out of one
    /// method into a newer one: list the newest home first (the zero-copy choice of
    /// `HiCacheController`: `attach_storage_backend` from 0.5.9, `__init__` before). Only
    /// that method is searched, so an anchor gone from it is drift, never found elsewhere.
    FirstMethodOf {
        class: ClassRef,
        names: &'static [&'static str],
    },
}

/// In the block of a function-scoped patch ([`PatchKind::FunctionStart`],
/// [`PatchKind::AfterAssign`]), this stands for the name of the function's first parameter as
/// the tree spells it (for a method, `self`): releases renamed parameters (`device_pool` ->
/// `buffer_info`), and one text then serves them all.
pub const FIRST_PARAM: &str = "{first_param}";

/// Python text to inject.
#[derive(Debug, Clone, Copy)]
pub enum Snippet {
    /// The body (docstring excluded) of `class` in `source`, a real `.py` file under `patches/`.
    /// The file stays valid, importable Python; the engine lifts the statements out of it.
    ClassBodyOf {
        source: &'static str,
        source_path: &'static str,
        class: &'static str,
    },
    /// A few literal lines (for one-liners such as a `register_backend(...)` call).
    Text(&'static str),
    /// The flag declarations in the body of `class` in `source` (each
    /// `name: A[T, Arg(help=..., choices=...)] = default`, the way SGLang 0.5.14+ declares
    /// arguments), rendered in an older era's syntax by `engine/declarations.rs`.
    Declarations {
        source: &'static str,
        source_path: &'static str,
        class: &'static str,
        form: DeclarationForm,
    },
}

/// How [`Snippet::Declarations`] are written out.
#[derive(Debug, Clone, Copy)]
pub enum DeclarationForm {
    /// As declared, with this namespace marker (e.g. `NS("memory")`) added as the last element
    /// of each `A[...]`.
    Namespaced(&'static str),
    /// Plain dataclass fields `name: T = default`, under a heading comment.
    DataclassFields { heading: &'static str },
    /// One `parser.add_argument(...)` per flag in the style of `ServerArgs.add_cli_args`, under
    /// a heading comment.
    AddArguments { heading: &'static str },
}

/// What a patch does.
#[derive(Debug, Clone, Copy)]
pub enum PatchKind {
    /// Create a new file at `dest` (package-relative) holding `source` plus a header line.
    InjectFile {
        dest: &'static str,
        source: &'static str,
    },
    /// Insert `block` into the body of `class`. `needs` are names the block uses that the
    /// target module must already bind (checked as part of the anchor: a missing import is drift).
    ClassBody {
        class: ClassRef,
        at: BodyAt,
        block: Snippet,
        needs: &'static [&'static str],
    },
    /// Insert `block` after the statement holding a call `callee("first_arg", ...)` in `file`.
    AfterCall {
        file: FileRef,
        callee: &'static str,
        first_arg: Option<&'static str>,
        block: Snippet,
    },
    /// Add `item` (Python source, e.g. `"juicefs"`) to a multi-line list literal.
    ListItem { list: ListRef, item: &'static str },
    /// Add `elif condition:` + `body` to the if/elif chain in `function` whose conditions
    /// mention `chain_has`, just before its `else:` (or after its last branch).
    ElifBranch {
        function: FnRef,
        chain_has: &'static str,
        condition: &'static str,
        body: Snippet,
    },
    /// Insert `block` as the first statements of `function`'s body (after its docstring, if
    /// any). [`FIRST_PARAM`] in the block is the function's first parameter.
    FunctionStart { function: FnRef, block: Snippet },
    /// Insert `block` right after the one statement assigning `target` (`target = ...` or
    /// `target: T = ...`) anywhere in `function`'s body. [`FIRST_PARAM`] as above.
    AfterAssign {
        function: FnRef,
        target: &'static str,
        block: Snippet,
    },
}

#[derive(Debug, Clone)]
pub struct Patch {
    /// Short id, unique in the group; `group/patch` is the marker tag.
    pub id: &'static str,
    /// One line for humans: what this patch adds.
    pub what: &'static str,
    pub kind: PatchKind,
}

#[derive(Debug, Clone)]
pub struct Group {
    pub id: &'static str,
    pub summary: &'static str,
    pub patches: Vec<Patch>,
}

impl Group {
    pub fn tag(&self, patch: &Patch) -> String {
        format!("{}/{}", self.id, patch.id)
    }
}
