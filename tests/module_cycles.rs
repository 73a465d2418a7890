//! No import cycles between the top-level modules of raft-log, node, the client library and
//! jepsen: reads each crate's `src/`, records an edge A -> B for every `crate::B` path in A
//! (items re-exported by `lib.rs` count for the module that defines them; test modules and
//! comments are skipped), and fails on any cycle, naming it.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// The source of `file` without comment lines and without its trailing `mod tests`.
fn code(file: &Path) -> String {
    let text = std::fs::read_to_string(file).expect("read source");
    let text = text.split("#[cfg(test)]\nmod tests").next().expect("split");
    text.lines()
        .filter(|l| !l.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// First path segments after each `crate::`, expanding `crate::{a, b::c}` into `a`, `b`.
fn crate_paths(code: &str) -> Vec<String> {
    let ident = |s: &str| -> String {
        s.trim()
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect()
    };
    let mut out = Vec::new();
    for rest in code.split("crate::").skip(1) {
        if let Some(group) = rest.strip_prefix('{') {
            let group = group.split('}').next().expect("group");
            out.extend(group.split(',').map(ident));
        } else {
            out.push(ident(rest));
        }
    }
    out.retain(|s| !s.is_empty());
    out
}

/// The edges between the top-level modules of the crate in `dir` (workspace-relative); panics
/// naming the first import cycle.
fn edges_without_cycles(dir: &str) -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(dir)
        .join("src");
    let modules: BTreeSet<String> = std::fs::read_dir(&src)
        .expect("read src")
        .map(|e| e.expect("entry").path())
        .filter_map(|p| Some(p.file_stem()?.to_str()?.to_owned()))
        .filter(|m| m != "lib" && m != "main")
        .collect();
    // A module is `name.rs` or `name/mod.rs`.
    let file = |module: &str| {
        let flat = src.join(format!("{module}.rs"));
        if flat.exists() {
            flat
        } else {
            src.join(module).join("mod.rs")
        }
    };
    // `pub use module::{A, B}` in lib.rs: A and B belong to `module`.
    let mut owner: BTreeMap<String, String> = BTreeMap::new();
    for line in code(&src.join("lib.rs")).lines() {
        let Some(rest) = line.trim().strip_prefix("pub use ") else {
            continue;
        };
        let (module, items) = rest.split_once("::").expect("pub use module::item");
        for item in items
            .split([',', '{', '}', ';', ' '])
            .filter(|s| !s.is_empty())
        {
            owner.insert(item.to_owned(), module.to_owned());
        }
    }
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for module in &modules {
        let targets = crate_paths(&code(&file(module)))
            .into_iter()
            .filter_map(|name| {
                if modules.contains(&name) {
                    Some(name)
                } else {
                    owner.get(&name).cloned()
                }
            })
            .filter(|target| target != module)
            .collect();
        edges.insert(module.clone(), targets);
    }
    // Depth-first search for a back edge; the path on the stack is the cycle.
    fn visit(
        at: &str,
        edges: &BTreeMap<String, BTreeSet<String>>,
        stack: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) {
        if done.contains(at) {
            return;
        }
        if let Some(start) = stack.iter().position(|m| m == at) {
            panic!(
                "import cycle: {} -> {at}; edges: {edges:#?}",
                stack[start..].join(" -> ")
            );
        }
        stack.push(at.to_owned());
        for next in &edges[at] {
            visit(next, edges, stack, done);
        }
        stack.pop();
        done.insert(at.to_owned());
    }
    let mut done = BTreeSet::new();
    for module in edges.keys() {
        visit(module, &edges, &mut Vec::new(), &mut done);
    }
    edges
}

#[test]
fn raft_log_has_no_import_cycles() {
    let edges = edges_without_cycles("raft-log");
    // The check sees the edges it should: segment uses durable, and wal uses most modules.
    assert!(edges["segment"].contains("durable"), "{edges:#?}");
    assert!(edges["wal"].contains("recovery"), "{edges:#?}");
}

#[test]
fn node_has_no_import_cycles() {
    let edges = edges_without_cycles("crates/node");
    assert!(edges["raft"].contains("state_machine"), "{edges:#?}");
    assert!(edges["raft_rpc"].contains("admin"), "{edges:#?}");
}

#[test]
fn client_has_no_import_cycles() {
    let edges = edges_without_cycles("crates/client");
    assert!(edges["client"].contains("pool"), "{edges:#?}");
}

#[test]
fn jepsen_has_no_import_cycles() {
    let edges = edges_without_cycles("jepsen");
    assert!(edges["live"].contains("report"), "{edges:#?}");
}
