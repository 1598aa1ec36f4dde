//! Shipped deployment files: the alert rules pass `promtool test rules` (real Prometheus
//! evaluation of the rules against series), and the dashboard and manifests parse.

use std::path::Path;

fn deploy() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

#[test]
fn alert_rules_fire_as_intended() {
    let promtool = ["/usr/bin/promtool", "promtool"]
        .into_iter()
        .find(|p| std::process::Command::new(p).arg("--version").output().is_ok());
    let promtool = promtool.expect("promtool is not installed: run scripts/setup.sh (Debian package prometheus)");
    let dir = deploy().join("prometheus");
    let o = std::process::Command::new(promtool)
        .args(["check", "rules", "veza-dr-alerts.yml"])
        .current_dir(&dir)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    let o = std::process::Command::new(promtool)
        .args(["test", "rules", "veza-dr-alerts.test.yml"])
        .current_dir(&dir)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
}

#[test]
fn dashboard_and_service_files_parse() {
    let d: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(deploy().join("grafana/veza-dr-dashboard.json")).unwrap())
            .unwrap();
    let exprs: Vec<&str> =
        d["panels"].as_array().unwrap().iter().filter_map(|p| p["targets"][0]["expr"].as_str()).collect();
    assert!(exprs.iter().any(|e| e.contains("veza_dr_last_success_timestamp_seconds")));
    let unit = std::fs::read_to_string(deploy().join("systemd/veza-dr.service")).unwrap();
    assert!(unit.contains("ExecStart=/usr/bin/veza-dr daemon") && unit.contains("ExecReload=/bin/kill -HUP $MAINPID"));
    let k8s = std::fs::read_to_string(deploy().join("kubernetes/veza-dr.yaml")).unwrap();
    assert!(k8s.contains("path: /healthz") && k8s.contains("secretRef"));
    // The policy embedded in the ConfigMap is a valid policy.
    let embedded: String = k8s
        .split("uploads.toml: |\n")
        .nth(1)
        .unwrap()
        .lines()
        .take_while(|l| l.starts_with("    "))
        .map(|l| format!("{}\n", &l[4..]))
        .collect();
    veza_dr::policy::Policy::parse(Path::new("uploads.toml"), &embedded).unwrap();
}
