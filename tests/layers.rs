//! The dependency rule of ARCHITECTURE.md inside `luo-cuse-dev`, checked on
//! the sources: a layer imports only from layers below it. (Between crates
//! the rule needs no test: each crate already depends on every crate before
//! it, so any other dependency would be a cycle, which cargo refuses.)

use std::path::{Path, PathBuf};

/// The layers of `cuse-dev/src`, lowest first; modules on one line are
/// peers that must not name each other.
const LAYERS: &[&[&str]] = &[
    &["sys", "log", "profile"],
    &["wire", "control"],
    &["uapi"],
    &["caller"],
    &["persist"],
    &["daemon", "client", "fuzzing"],
    &["tools"],
];

fn rank(module: &str) -> Option<usize> {
    LAYERS.iter().position(|l| l.contains(&module))
}

fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The top-level modules a source file names through `crate::`, outside
/// comments and its tests.
fn named_modules(text: &str) -> Vec<String> {
    let code: String = text
        .split("#[cfg(test)]")
        .next()
        .unwrap()
        .lines()
        .map(|l| l.split("//").next().unwrap())
        .collect::<Vec<_>>()
        .join("\n");
    let mut found = Vec::new();
    for (i, _) in code.match_indices("crate::") {
        let rest = &code[i + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let group = &group[..group.find('}').unwrap()];
            for item in group.split(',') {
                let name = item.trim().split("::").next().unwrap().trim();
                if !name.is_empty() && name != "self" {
                    found.push(name.to_owned());
                }
            }
        } else {
            let end = rest
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(rest.len());
            found.push(rest[..end].to_owned());
        }
    }
    found
}

#[test]
fn layers_import_only_downward() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    sources(&src, &mut files);
    let mut broken = Vec::new();
    for file in &files {
        let relative = file.strip_prefix(&src).unwrap();
        let top = relative
            .components()
            .next()
            .unwrap()
            .as_os_str()
            .to_string_lossy();
        let top = top.trim_end_matches(".rs").to_owned();
        if top == "bin" || top == "lib" {
            continue;
        }
        let own = rank(&top).unwrap_or_else(|| panic!("{top} is in no layer of this test"));
        for named in named_modules(&std::fs::read_to_string(file).unwrap()) {
            if named == top {
                continue;
            }
            let theirs = rank(&named).unwrap_or_else(|| panic!("{named} is in no layer"));
            if theirs >= own {
                broken.push(format!("{} names crate::{named}", relative.display()));
            }
        }
    }
    assert!(
        broken.is_empty(),
        "imports against the layers:\n{}",
        broken.join("\n")
    );
}
