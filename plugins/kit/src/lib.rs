//! Helpers shared by the runbook-step plugins. Pure functions only: no bindings, no I/O, so
//! they are tested natively with `cargo test -p kit`.

/// A step's configuration as the host passes it: `(key, value)` pairs.
pub type Config = [(String, String)];

/// The value of `key`, if set.
pub fn get<'a>(cfg: &'a Config, key: &str) -> Option<&'a str> {
    cfg.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
}

/// The value of `key`, or an error naming it.
pub fn require<'a>(cfg: &'a Config, key: &str) -> Result<&'a str, String> {
    match get(cfg, key) {
        Some(v) if !v.is_empty() => Ok(v),
        _ => Err(format!("`{key}` is required")),
    }
}

/// Refuse keys the plugin does not know, so a typo is an error instead of a silent default.
pub fn known_keys(cfg: &Config, allowed: &[&str]) -> Result<(), String> {
    for (k, _) in cfg {
        if !allowed.contains(&k.as_str()) {
            return Err(format!("unknown key `{k}` (known: {})", allowed.join(", ")));
        }
    }
    Ok(())
}

/// `500ms`, `30s`, `5m`, `2h`, or a bare number of seconds.
pub fn duration_ms(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().map_err(|_| format!("`{s}` is not a duration (write e.g. 30s, 5m, 500ms)"))?;
    let mult = match unit.trim() {
        "ms" => 1,
        "" | "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        _ => return Err(format!("`{s}` has an unknown unit (use ms, s, m or h)")),
    };
    Ok(n * mult)
}

/// A duration from the configuration, or `default` when unset.
pub fn duration_or(cfg: &Config, key: &str, default: u64) -> Result<u64, String> {
    get(cfg, key).map(|v| duration_ms(v).map_err(|e| format!("`{key}`: {e}"))).unwrap_or(Ok(default))
}

/// An integer from the configuration, or `default` when unset.
pub fn int_or(cfg: &Config, key: &str, default: i64) -> Result<i64, String> {
    get(cfg, key)
        .map(|v| v.trim().parse().map_err(|_| format!("`{key}` must be an integer, got `{v}`")))
        .unwrap_or(Ok(default))
}

/// Replace `{{name}}` with the value of fact `name`; unknown names stay as they are.
pub fn render(template: &str, facts: &[(String, String)]) -> String {
    let mut out = String::with_capacity(template.len());
    let mut rest = template;
    while let Some(start) = rest.find("{{") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        match after.find("}}") {
            Some(end) => {
                let name = after[..end].trim();
                match facts.iter().find(|(k, _)| k == name) {
                    Some((_, v)) => out.push_str(v),
                    None => out.push_str(&rest[start..start + 2 + end + 2]),
                }
                rest = &after[end + 2..];
            }
            None => {
                out.push_str(&rest[start..]);
                rest = "";
            }
        }
    }
    out.push_str(rest);
    out
}

/// A JSON string literal (with quotes).
pub fn json_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// The `host[:port]` of an http(s) URL, as grants name it. A URL that is a secret reference
/// (`${secret:NAME}`) has no host the plugin can know: `None`.
pub fn url_authority(url: &str) -> Result<Option<String>, String> {
    if url.starts_with("${secret:") {
        return Ok(None);
    }
    let rest = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"))
        .ok_or_else(|| format!("`{url}` is not an http:// or https:// URL"))?;
    let auth = rest.split(['/', '?', '#']).next().unwrap_or("");
    let auth = auth.rsplit('@').next().unwrap_or(auth);
    if auth.is_empty() {
        return Err(format!("`{url}` has no host"));
    }
    Ok(Some(auth.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(duration_ms("500ms"), Ok(500));
        assert_eq!(duration_ms("30s"), Ok(30_000));
        assert_eq!(duration_ms("5m"), Ok(300_000));
        assert_eq!(duration_ms("12"), Ok(12_000));
        assert!(duration_ms("5 parsecs").is_err());
        assert!(duration_ms("m").is_err());
    }

    #[test]
    fn templates_use_facts_and_keep_unknown_names() {
        let facts = vec![("runbook".to_string(), "db-failover".to_string())];
        assert_eq!(render("{{ runbook }} done, {{nope}} {{", &facts), "db-failover done, {{nope}} {{");
    }

    #[test]
    fn json_strings_are_escaped() {
        assert_eq!(json_string("a \"b\"\n\u{1}"), "\"a \\\"b\\\"\\n\\u0001\"");
    }

    #[test]
    fn authorities() {
        assert_eq!(url_authority("http://127.0.0.1:8081/api/v1?x").unwrap().as_deref(), Some("127.0.0.1:8081"));
        assert_eq!(url_authority("https://u:p@hooks.example/x").unwrap().as_deref(), Some("hooks.example"));
        assert_eq!(url_authority("${secret:hook}").unwrap(), None);
        assert!(url_authority("ftp://x").is_err());
    }
}
