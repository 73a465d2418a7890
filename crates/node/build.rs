//! Compiles the web client's files (`web/static/`) into the node: `web_assets.rs` in OUT_DIR
//! holds `find(path)`, a match over every file with its content type, so a node serves the
//! page without files beside it and no request path can reach anything else.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

fn main() {
    // Read at run time, not with env!: the compiled build script is shared by every clone
    // that uses the same target directory, and a path baked in may name a deleted clone.
    let manifest = std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR");
    let root = Path::new(&manifest).join("../../web/static");
    println!("cargo:rerun-if-changed={}", root.display());
    let mut files = Vec::new();
    walk(&root, &mut files);
    files.sort();
    assert!(
        files.iter().any(|f| f.ends_with("index.html")),
        "no web/static/index.html under {}: the node would serve no page",
        root.display()
    );
    let mut out = String::from(
        "/// The compiled-in file at `path` (relative to web/static) and its content type.\n\
         pub fn find(path: &str) -> Option<(&'static str, &'static [u8])> {\n    match path {\n",
    );
    for file in &files {
        let relative = file.strip_prefix(&root).expect("under the root");
        let name = relative
            .to_str()
            .expect("asset names are UTF-8")
            .replace('\\', "/");
        let Some(kind) = content_type(&name) else {
            continue;
        };
        let absolute = file.canonicalize().expect("asset path");
        writeln!(
            out,
            "        {name:?} => Some(({kind:?}, include_bytes!({:?}))),",
            absolute.display().to_string()
        )
        .expect("writing to a string");
    }
    out.push_str("        _ => None,\n    }\n}\n");
    let dest = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR")).join("web_assets.rs");
    std::fs::write(dest, out).expect("writing web_assets.rs");
}

/// Files of the kinds a page uses; anything else in the directory (notes, editor files) is
/// not served.
fn content_type(name: &str) -> Option<&'static str> {
    let extension = name.rsplit_once('.')?.1;
    Some(match extension {
        "html" => "text/html; charset=utf-8",
        "js" | "mjs" => "text/javascript; charset=utf-8",
        "css" => "text/css; charset=utf-8",
        "svg" => "image/svg+xml",
        "png" => "image/png",
        "ico" => "image/x-icon",
        "json" => "application/json",
        _ => return None,
    })
}

fn walk(dir: &Path, files: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name();
        if name.to_string_lossy().starts_with('.') {
            continue;
        }
        if path.is_dir() {
            walk(&path, files);
        } else {
            files.push(path);
        }
    }
}
