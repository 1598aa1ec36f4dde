//! Every policy shipped in `policies/` parses, and the README's demo command works.

use crate::common::*;

#[test]
fn every_shipped_policy_parses() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies");
    let results = veza_dr::policy::load_dir(&dir).unwrap();
    assert!(results.len() >= 2, "expected the shipped example policies");
    for r in &results {
        if let Err(e) = r {
            panic!("shipped policy does not parse: {}", e.message);
        }
    }
    let names: Vec<String> = results.into_iter().map(|r| r.unwrap().name).collect();
    assert!(names.contains(&"db".to_string()) && names.contains(&"uploads".to_string()), "{names:?}");
    let o = std::process::Command::new(bin()).args(["policy", "check"]).arg(&dir).output().unwrap();
    assert!(o.status.success(), "{}", stdout(&o));
    assert!(
        stdout(&o).contains(
            "ok    runbook db-failover: promote (pg-promote) -> app-healthy (http-check) -> notify (webhook-notify)"
        ),
        "{}",
        stdout(&o)
    );
    let runbooks: Vec<String> = veza_dr::policy::load_documents(&dir)
        .unwrap()
        .into_iter()
        .flat_map(|(_, d)| d.unwrap().runbooks.into_iter().map(|r| r.name))
        .collect();
    assert_eq!(runbooks, ["db-failover", "region-failover"]);
}

#[test]
fn the_demo_backs_up_lists_and_restores() {
    let dir = tempfile::tempdir().unwrap();
    let o = std::process::Command::new(bin()).args(["demo", "--dir"]).arg(dir.path()).output().unwrap();
    let out = stdout(&o);
    assert!(o.status.success(), "{out}\n{}", stderr(&o));
    assert!(out.contains("(full)") && out.contains("(incremental)"), "{out}");
    assert!(out.contains("restored tree is identical to the source"), "{out}");
    tree::assert_same(&dir.path().join("source"), &dir.path().join("restored"));
}
