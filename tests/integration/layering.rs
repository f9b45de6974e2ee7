//! The pure crates stay pure: `muster-core` and `muster-sched` must not reach tokio, tonic,
//! prost, sled or openraft, even transitively.

use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};

const FORBIDDEN: [&str; 5] = ["tokio", "tonic", "prost", "sled", "openraft"];

#[test]
fn pure_crates_do_not_depend_on_io_crates() {
    let output = std::process::Command::new(env!("CARGO"))
        .args(["metadata", "--format-version", "1", "--offline"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("cargo metadata runs");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let metadata: Value = serde_json::from_slice(&output.stdout).unwrap();
    let names: BTreeMap<&str, &str> = metadata["packages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p["id"].as_str().unwrap(), p["name"].as_str().unwrap()))
        .collect();
    // Normal (non-dev, non-build) dependency edges of the resolved graph.
    let edges: BTreeMap<&str, Vec<&str>> = metadata["resolve"]["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| {
            let deps = n["deps"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|d| {
                    d["dep_kinds"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .any(|k| k["kind"].is_null())
                })
                .map(|d| d["pkg"].as_str().unwrap())
                .collect();
            (n["id"].as_str().unwrap(), deps)
        })
        .collect();
    for root in ["muster-core", "muster-sched"] {
        let start = names
            .iter()
            .find(|(_, n)| **n == root)
            .map(|(id, _)| *id)
            .expect("crate in workspace");
        let mut seen = BTreeSet::new();
        let mut stack = vec![start];
        while let Some(id) = stack.pop() {
            if seen.insert(id) {
                stack.extend(edges.get(id).into_iter().flatten().copied());
            }
        }
        let reached: BTreeSet<&str> = seen.iter().map(|id| names[id]).collect();
        for bad in FORBIDDEN {
            assert!(
                !reached.contains(bad),
                "{root} depends on {bad} (through {reached:?})"
            );
        }
        assert!(
            reached.contains("serde"),
            "the walk found {root}'s dependencies"
        );
    }
}
