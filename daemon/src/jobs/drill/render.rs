//! Rendering a drill report for people: Markdown, and one self-contained HTML page with the
//! history of every drill of the policy drawn as an SVG chart (no scripts, no external files).

use super::report::{Report, Verdict};

pub fn markdown(rep: &Report) -> String {
    let secs = |v: Option<f64>| v.map(|s| format!("{s:.1} s")).unwrap_or_else(|| "—".into());
    let mut m = format!("# Restore drill of `{}`: **{}**\n\n", rep.policy, rep.verdict.as_str().to_uppercase());
    m += &format!(
        "Drill {} on {}, {} → {}.\n\n",
        rep.id,
        rep.host,
        rep.started.format("%Y-%m-%d %H:%M:%S UTC"),
        rep.finished.format("%H:%M:%S UTC")
    );
    if let Some(f) = &rep.failure {
        m += &format!("**Failure:** {f}\n\n");
    }
    m += "| objective | measured | target | verdict |\n|---|---|---|---|\n";
    m += &format!(
        "| RTO | {} | {} | {} |\n",
        secs(rep.rto.measured_seconds),
        secs(rep.rto.objective_seconds),
        rep.rto.verdict.as_str()
    );
    m += &format!(
        "| RPO | {} | {} | {} |\n\n",
        secs(rep.rpo.measured_seconds),
        secs(rep.rpo.objective_seconds),
        rep.rpo.verdict.as_str()
    );
    m += &format!(
        "Snapshot {}; WAL from {}; recovered to {}; last transaction {}.\n\n",
        rep.snapshot.as_deref().unwrap_or("—"),
        rep.wal_from.as_deref().unwrap_or("—"),
        rep.recovered_lsn.as_deref().unwrap_or("—"),
        rep.last_transaction.as_deref().unwrap_or("—")
    );
    m += "| phase | time | ok | detail |\n|---|---|---|---|\n";
    for p in &rep.phases {
        m += &format!(
            "| {} | {:.1} s | {} | {} |\n",
            p.name,
            p.seconds,
            if p.ok { "yes" } else { "**no**" },
            p.detail.replace('|', "\\|")
        );
    }
    if !rep.checks.is_empty() {
        m += "\n| check | expected | got | ok |\n|---|---|---|---|\n";
        for c in &rep.checks {
            m += &format!("| {} | {} | {} | {} |\n", c.name, c.expected, c.got, if c.ok { "yes" } else { "**no**" });
        }
    }
    m
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// An SVG chart of measured RTO and RPO over every drill, with the objectives as dashed lines.
fn chart(history: &[Report]) -> String {
    let (w, h, pad) = (640.0, 220.0, 40.0);
    let series = |f: &dyn Fn(&Report) -> Option<f64>| -> Vec<Option<f64>> { history.iter().map(f).collect() };
    let rto = series(&|r| r.rto.measured_seconds);
    let rpo = series(&|r| r.rpo.measured_seconds);
    let rto_obj = history.last().and_then(|r| r.rto.objective_seconds);
    let rpo_obj = history.last().and_then(|r| r.rpo.objective_seconds);
    let top =
        rto.iter().chain(rpo.iter()).flatten().copied().chain(rto_obj).chain(rpo_obj).fold(1.0f64, f64::max) * 1.1;
    let n = history.len().max(2) as f64;
    let x = |i: usize| pad + (w - 2.0 * pad) * i as f64 / (n - 1.0);
    let y = |v: f64| h - pad - (h - 2.0 * pad) * v / top;
    let line = |vals: &[Option<f64>], color: &str| {
        let pts: Vec<String> =
            vals.iter().enumerate().filter_map(|(i, v)| v.map(|v| format!("{:.1},{:.1}", x(i), y(v)))).collect();
        let dots: String = vals
            .iter()
            .enumerate()
            .filter_map(|(i, v)| {
                v.map(|v| format!("<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"3\" fill=\"{color}\"/>", x(i), y(v)))
            })
            .collect();
        format!("<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"2\" points=\"{}\"/>{dots}", pts.join(" "))
    };
    let objective = |v: Option<f64>, color: &str, label: &str| {
        v.map(|v| {
            format!(
                "<line x1=\"{pad}\" x2=\"{:.1}\" y1=\"{y:.1}\" y2=\"{y:.1}\" stroke=\"{color}\" stroke-dasharray=\"6 4\"/><text x=\"{:.1}\" y=\"{:.1}\" font-size=\"11\" fill=\"{color}\">{label} {v:.0} s</text>",
                w - pad,
                w - pad - 110.0,
                y(v) - 4.0,
                y = y(v)
            )
        })
        .unwrap_or_default()
    };
    format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" role=\"img\" aria-label=\"measured RTO and RPO per drill\"><rect width=\"100%\" height=\"100%\" fill=\"#fff\"/><line x1=\"{pad}\" y1=\"{:.1}\" x2=\"{:.1}\" y2=\"{:.1}\" stroke=\"#999\"/>{}{}{}{}<text x=\"{pad}\" y=\"16\" font-size=\"12\">seconds (top {top:.0}); blue RTO, orange RPO; {} drills</text></svg>",
        h - pad,
        w - pad,
        h - pad,
        objective(rto_obj, "#1f6feb", "RTO objective"),
        objective(rpo_obj, "#d97706", "RPO objective"),
        line(&rto, "#1f6feb"),
        line(&rpo, "#d97706"),
        history.len()
    )
}

/// The report as one self-contained HTML page: verdict first, then objectives, phases, checks,
/// the snapshot and WAL used, and the chart of every drill of the policy.
pub fn html(rep: &Report, history: &[Report]) -> String {
    let secs = |v: Option<f64>| v.map(|s| format!("{s:.1} s")).unwrap_or_else(|| "—".into());
    let color = match rep.verdict {
        Verdict::Pass => "#1a7f37",
        Verdict::PassWithWarning => "#9a6700",
        Verdict::Fail => "#cf222e",
    };
    let mut b = format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>veza-dr drill {id} of {policy}: {verdict}</title><style>body{{font-family:system-ui,sans-serif;max-width:760px;margin:2em auto;color:#1f2328}}table{{border-collapse:collapse;margin:1em 0}}td,th{{border:1px solid #d0d7de;padding:4px 8px;text-align:left}}.verdict{{font-size:2em;font-weight:bold;color:{color}}}.no{{color:#cf222e;font-weight:bold}}</style></head><body>",
        id = esc(&rep.id),
        policy = esc(&rep.policy),
        verdict = esc(rep.verdict.as_str())
    );
    b += &format!("<p class=\"verdict\" id=\"verdict\">{}</p>", esc(&rep.verdict.as_str().to_uppercase()));
    b += &format!(
        "<h1>Restore drill of {}</h1><p>Drill {} on {}, {} to {}.</p>",
        esc(&rep.policy),
        esc(&rep.id),
        esc(&rep.host),
        rep.started.format("%Y-%m-%d %H:%M:%S UTC"),
        rep.finished.format("%H:%M:%S UTC")
    );
    if let Some(f) = &rep.failure {
        b += &format!("<p class=\"no\" id=\"failure\">Failure: {}</p>", esc(f));
    }
    b += "<table id=\"objectives\"><tr><th>objective</th><th>measured</th><th>target</th><th>verdict</th></tr>";
    for (name, o) in [("RTO", &rep.rto), ("RPO", &rep.rpo)] {
        b += &format!(
            "<tr><td>{name}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            secs(o.measured_seconds),
            secs(o.objective_seconds),
            esc(o.verdict.as_str())
        );
    }
    b += "</table>";
    b += &format!(
        "<p>Snapshot {}; WAL from {}; recovered to {}; last transaction {}.</p>",
        esc(rep.snapshot.as_deref().unwrap_or("—")),
        esc(rep.wal_from.as_deref().unwrap_or("—")),
        esc(rep.recovered_lsn.as_deref().unwrap_or("—")),
        esc(rep.last_transaction.as_deref().unwrap_or("—"))
    );
    b += "<h2>Phases</h2><table id=\"phases\"><tr><th>phase</th><th>time</th><th>ok</th><th>detail</th></tr>";
    for p in &rep.phases {
        b += &format!(
            "<tr><td>{}</td><td>{:.1} s</td><td{}>{}</td><td>{}</td></tr>",
            esc(&p.name),
            p.seconds,
            if p.ok { "" } else { " class=\"no\"" },
            if p.ok { "yes" } else { "no" },
            esc(&p.detail)
        );
    }
    b += "</table>";
    if !rep.checks.is_empty() {
        b += "<h2>Checks</h2><table id=\"checks\"><tr><th>check</th><th>expected</th><th>got</th><th>ok</th></tr>";
        for c in &rep.checks {
            b += &format!(
                "<tr><td>{}</td><td>{}</td><td>{}</td><td{}>{}</td></tr>",
                esc(&c.name),
                esc(&c.expected),
                esc(&c.got),
                if c.ok { "" } else { " class=\"no\"" },
                if c.ok { "yes" } else { "no" }
            );
        }
        b += "</table>";
    }
    b += &format!("<h2>Every drill of {}</h2>{}", esc(&rep.policy), chart(history));
    b += "<table id=\"history\"><tr><th>drill</th><th>verdict</th><th>RTO</th><th>RPO</th></tr>";
    for r in history.iter().rev() {
        b += &format!(
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            esc(&r.id),
            esc(r.verdict.as_str()),
            secs(r.rto.measured_seconds),
            secs(r.rpo.measured_seconds)
        );
    }
    b += "</table>";
    if let Some(s) = &rep.signature {
        b += &format!("<p><small>Signed ({}) by {}; check with <code>veza-dr report verify</code> on the JSON report.</small></p>", esc(&s.algorithm), esc(&s.public_key));
    }
    b + "</body></html>\n"
}
