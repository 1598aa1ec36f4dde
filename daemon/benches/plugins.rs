//! Plugin host figures: cold load (compile), warm load (compiled cache), and the cost of one
//! step call (instantiate with limits + `describe`), per plugin in plugins/dist and the test
//! fixture in plugins/test.
//!
//!     bash plugins/build.sh && cargo bench --bench plugins
//!
//! Targets (issue 6): warm load + call < 1 ms for small plugins, cold load < 50 ms.

use std::path::Path;
use std::time::{Duration, Instant};
use veza_dr::runbook::host::{Host, StepState};

fn median(mut v: Vec<Duration>) -> f64 {
    v.sort();
    v[v.len() / 2].as_secs_f64() * 1e3
}

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../plugins");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let mut plugins: Vec<(String, std::path::PathBuf)> = ["dist", "test"]
        .iter()
        .flat_map(|d| std::fs::read_dir(root.join(d)).expect("plugins/dist: run plugins/build.sh first"))
        .filter_map(|e| {
            let p = e.ok()?.path();
            Some((p.file_stem()?.to_string_lossy().into_owned(), p.parent()?.to_path_buf()))
        })
        .collect();
    plugins.sort();
    println!(
        "{:<16} {:>9} {:>11} {:>11} {:>11} {:>14}",
        "plugin", "size", "cold ms", "warm ms", "call ms", "warm+call ms"
    );
    for (name, dir) in plugins {
        let size = std::fs::metadata(dir.join(format!("{name}.wasm"))).map(|m| m.len()).unwrap_or(0);
        let cold: Vec<Duration> = (0..5)
            .map(|_| {
                let cache = tempfile::tempdir().expect("tempdir");
                let host = Host::new(&dir, Some(cache.path())).expect("host");
                let t = Instant::now();
                let p = host.load(&name).expect("load");
                assert!(!p.cached);
                t.elapsed()
            })
            .collect();
        let cache = tempfile::tempdir().expect("tempdir");
        let host = Host::new(&dir, Some(cache.path())).expect("host");
        host.load(&name).expect("fill the cache");
        let warm: Vec<Duration> = (0..50)
            .map(|_| {
                let t = Instant::now();
                let p = host.load(&name).expect("load");
                assert!(p.cached);
                t.elapsed()
            })
            .collect();
        let plugin = host.load(&name).expect("load");
        let call: Vec<Duration> = (0..200)
            .map(|_| {
                let state = StepState::new(
                    "bench",
                    "describe",
                    Default::default(),
                    Default::default(),
                    Default::default(),
                    Duration::from_secs(5),
                    64 << 20,
                    true,
                    rt.handle().clone(),
                );
                let t = Instant::now();
                let mut i = host.instantiate(&plugin, state).expect("instantiate");
                i.describe().expect("describe");
                t.elapsed()
            })
            .collect();
        let (c, w, k) = (median(cold), median(warm), median(call));
        println!("{name:<16} {:>7}KB {c:>11.2} {w:>11.3} {k:>11.3} {:>14.3}", size / 1000, w + k);
    }
}
