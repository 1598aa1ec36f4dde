//! Runbook steps built into the host (`restore`, `drill`, `wait-sql`): checked before step 1
//! runs, read-only in a dry run. The region failover that uses them end to end is in `region`.

use crate::common::{free_port, stderr, stdout};
use crate::runbook::Books;
use std::time::{Duration, Instant};

/// Built-in steps keep the plugin steps' contract: a bad `with` fails before step 1 runs,
/// wait-sql only reads, and a wait that never comes true fails with what it last saw.
#[test]
fn built_in_steps_are_checked_before_anything_runs() {
    let dead = free_port();
    let book = |steps: &str| {
        format!(
            "[[runbook]]\nname = \"rb\"\nconnections = {{ db = \"host=127.0.0.1 port={dead} user=nobody dbname=postgres connect_timeout=1\" }}\n\
             [[runbook.step]]\nname = \"first\"\nplugin = \"fixture\"\nwith = {{ mode = \"ok\" }}\n{steps}"
        )
    };
    let cases = [
        ("[[runbook.step]]\nname = \"s\"\nbuiltin = \"restor\"\n", "there is no built-in step `restor`"),
        (
            "[[runbook.step]]\nname = \"s\"\nbuiltin = \"restore\"\nplugin = \"fixture\"\n",
            "`plugin` and `builtin` exclude each other",
        ),
        (
            "[[runbook.step]]\nname = \"s\"\nbuiltin = \"restore\"\nwith = { policy = \"nope\", target = \"/tmp/x\" }\n",
            "step `s` (built-in `restore`): validate: invalid config: policy `nope`",
        ),
        (
            "[[runbook.step]]\nname = \"s\"\nbuiltin = \"restore\"\nwith = { policy = \"nope\", tagret = \"/tmp/x\" }\n",
            "unknown field `tagret`",
        ),
        (
            "[[runbook.step]]\nname = \"s\"\nbuiltin = \"wait-sql\"\nwith = { connection = \"db\", query = \"DELETE FROM users\" }\ngrants = { connections = [\"db\"] }\n",
            "invalid config: query:",
        ),
        (
            "[[runbook.step]]\nname = \"s\"\nbuiltin = \"wait-sql\"\nwith = { connection = \"db\", query = \"SELECT true\" }\n",
            "connection `db` is not granted",
        ),
    ];
    let (_, recipient) = veza_dr::crypto::seal::generate_identity();
    let db = format!(
        "[source]\ntype = \"postgres\"\nmethod = \"physical\"\ndsn = \"host=/tmp\"\ndata-dir = \"/tmp/none\"\n\
         [repository]\nurl = \"file:///tmp/none\"\n[encryption]\nrecipients = [\"{recipient}\"]\n"
    );
    let restore = |with: &str| {
        format!("[[runbook.step]]\nname = \"s\"\nbuiltin = \"restore\"\nwith = {{ policy = \"db\", target = \"/tmp/x\", {with} }}\n")
    };
    let bad_lsn = restore("to-lsn = \"zz\"");
    let two_targets = restore("to-lsn = \"0/3000000\", immediate = true");
    let cases = cases.into_iter().chain([
        (bad_lsn.as_str(), "step `s` (built-in `restore`): validate: invalid config:"),
        (two_targets.as_str(), "name at most one recovery target"),
    ]);
    for (steps, want) in cases {
        let b = Books::new(&book(steps));
        std::fs::write(b.path("policies/db.toml"), &db).unwrap();
        let out = b.run(&["failover", "rb", "--yes"]);
        // A declaration serde refuses makes the file unparsable (exit 1, the runbook not found,
        // the file's error in the hint); a `with` the step refuses is a policy error (exit 2).
        assert!(matches!(out.status.code(), Some(1 | 2)), "{steps}\n{}{}", stdout(&out), stderr(&out));
        assert!(stderr(&out).contains(want), "{steps}\nwant {want}\n{}", stderr(&out));
        assert!(b.audit().is_empty(), "step 1 ran before a later step was checked: {:?}", b.audit());
    }
    // A wait that never comes true fails after `within`, naming what it last saw.
    let wait = "[[runbook.step]]\nname = \"ready\"\nbuiltin = \"wait-sql\"\nwith = { connection = \"db\", query = \"SELECT NOT pg_is_in_recovery()\", within = \"3s\", interval = \"500ms\" }\ngrants = { connections = [\"db\"] }\n";
    let b = Books::new(&book(wait));
    let plan = b.ok(&["failover", "rb", "--dry-run"]);
    assert!(plan.contains("poll connection `db` every 500ms with `SELECT NOT pg_is_in_recovery()`"), "{plan}");
    let t = Instant::now();
    let out = b.run(&["failover", "rb", "--yes"]);
    assert_eq!(out.status.code(), Some(1), "{}{}", stdout(&out), stderr(&out));
    assert!(t.elapsed() < Duration::from_secs(30), "{:?}", t.elapsed());
    assert!(stderr(&out).contains("did not return true within 3s"), "{}", stderr(&out));
    assert!(stderr(&out).contains("step `ready` (built-in `wait-sql`)"), "{}", stderr(&out));
}
