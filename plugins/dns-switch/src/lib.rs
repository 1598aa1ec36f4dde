//! `dns-switch`: point a DNS record (A, AAAA or CNAME) at a new value through the PowerDNS
//! authoritative server's HTTP API. `plan` reads the zone and shows old -> new; `run` replaces
//! the record set; `verify` reads it back.
//!
//! Config: `api` (required, e.g. `http://127.0.0.1:8081`), `server` (`localhost`), `zone`
//! (required, e.g. `example.org.`), `name` (required, e.g. `db.example.org.`), `type` (A),
//! `content` (required), `ttl` (60), `api-key` (required: the name of a secret granted to the
//! step; the host puts its value in the `X-API-Key` header, the plugin never sees it).

wit_bindgen::generate!({ world: "runbook-step", path: "../../wit" });

use exports::veza::dr::step::Guest;
use veza::dr::host::{self, HttpRequest};
use veza::dr::types::{Context, Description, Grants, Outcome, StepError};

struct Plugin;
export!(Plugin);

const KEYS: &[&str] = &["api", "server", "zone", "name", "type", "content", "ttl", "api-key"];

struct Cfg {
    api: String,
    server: String,
    zone: String,
    name: String,
    rtype: String,
    content: String,
    ttl: i64,
    secret: String,
}

fn fqdn(s: &str) -> String {
    if s.ends_with('.') {
        s.to_string()
    } else {
        format!("{s}.")
    }
}

fn parse(cfg: &kit::Config) -> Result<Cfg, StepError> {
    (|| -> Result<Cfg, String> {
        kit::known_keys(cfg, KEYS)?;
        let api = kit::require(cfg, "api")?.trim_end_matches('/').to_string();
        if kit::url_authority(&api)?.is_none() {
            return Err("`api` must be a plain URL; put the key in `api-key`".into());
        }
        let rtype = kit::get(cfg, "type").unwrap_or("A").to_ascii_uppercase();
        if !["A", "AAAA", "CNAME"].contains(&rtype.as_str()) {
            return Err(format!("`type` {rtype} is not supported (A, AAAA or CNAME)"));
        }
        let zone = fqdn(kit::require(cfg, "zone")?);
        let name = fqdn(kit::require(cfg, "name")?);
        if !(name == zone || name.ends_with(&format!(".{zone}"))) {
            return Err(format!("`name` {name} is not inside zone {zone}"));
        }
        let content = kit::require(cfg, "content")?.to_string();
        if rtype == "A" && content.parse::<std::net::Ipv4Addr>().is_err() {
            return Err(format!("`content` {content} is not an IPv4 address"));
        }
        if rtype == "AAAA" && content.parse::<std::net::Ipv6Addr>().is_err() {
            return Err(format!("`content` {content} is not an IPv6 address"));
        }
        let ttl = kit::int_or(cfg, "ttl", 60)?;
        if !(1..=604_800).contains(&ttl) {
            return Err(format!("`ttl` {ttl} is out of range"));
        }
        Ok(Cfg {
            api,
            server: kit::get(cfg, "server").unwrap_or("localhost").to_string(),
            zone,
            name,
            content: if rtype == "CNAME" { fqdn(&content) } else { content },
            rtype,
            ttl,
            secret: kit::require(cfg, "api-key")?.to_string(),
        })
    })()
    .map_err(StepError::InvalidConfig)
}

impl Cfg {
    fn zone_url(&self) -> String {
        format!("{}/api/v1/servers/{}/zones/{}", self.api, self.server, self.zone)
    }

    fn request(&self, method: &str, body: Vec<u8>) -> Result<(u16, Vec<u8>), StepError> {
        let resp = host::http(&HttpRequest {
            method: method.into(),
            url: self.zone_url(),
            headers: vec![
                ("X-API-Key".into(), format!("${{secret:{}}}", self.secret)),
                ("content-type".into(), "application/json".into()),
            ],
            body,
            timeout_ms: Some(10_000),
        })?;
        Ok((resp.status, resp.body))
    }

    /// The record set's current contents (empty if it does not exist).
    fn current(&self) -> Result<Vec<String>, StepError> {
        let (status, body) = self.request("GET", vec![])?;
        match status {
            200 => {}
            401 | 403 => {
                return Err(StepError::Failed(format!(
                    "PowerDNS refused the API key in secret `{}` ({status})",
                    self.secret
                )))
            }
            404 | 422 => return Err(StepError::Failed(format!("zone {} not found on {}", self.zone, self.api))),
            s if s >= 500 => return Err(StepError::Retryable(format!("PowerDNS answered {s}"))),
            s => return Err(StepError::Failed(format!("PowerDNS answered {s}: {}", String::from_utf8_lossy(&body)))),
        }
        let zone: serde_json::Value =
            serde_json::from_slice(&body).map_err(|e| StepError::Failed(format!("PowerDNS sent invalid JSON: {e}")))?;
        let sets = zone["rrsets"].as_array().cloned().unwrap_or_default();
        Ok(sets
            .iter()
            .filter(|s| s["name"] == self.name.as_str() && s["type"] == self.rtype.as_str())
            .flat_map(|s| s["records"].as_array().cloned().unwrap_or_default())
            .filter_map(|r| r["content"].as_str().map(str::to_string))
            .collect())
    }

    fn shown(&self, contents: &[String]) -> String {
        if contents.is_empty() {
            "(no record)".into()
        } else {
            contents.join(", ")
        }
    }
}

impl Guest for Plugin {
    fn describe() -> Description {
        Description {
            name: "dns-switch".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            summary: "Point an A, AAAA or CNAME record at a new value through the PowerDNS HTTP API".into(),
            needs: Grants { http: vec![], connections: vec![], secrets: vec![] },
            verifies: true,
        }
    }

    fn needs_for(config: Vec<(String, String)>) -> Result<Grants, StepError> {
        let c = parse(&config)?;
        Ok(Grants {
            http: kit::url_authority(&c.api).map_err(StepError::InvalidConfig)?.into_iter().collect(),
            connections: vec![],
            secrets: vec![c.secret],
        })
    }

    fn validate(config: Vec<(String, String)>) -> Result<(), StepError> {
        parse(&config).map(|_| ())
    }

    fn plan(ctx: Context) -> Result<Vec<String>, StepError> {
        let c = parse(&ctx.config)?;
        let now = c.current()?;
        if now == [c.content.clone()] {
            return Ok(vec![format!("{} {} already points at {}: nothing to change", c.name, c.rtype, c.content)]);
        }
        Ok(vec![format!(
            "change {} {} in zone {} from {} to {} (ttl {}) via {}",
            c.name,
            c.rtype,
            c.zone,
            c.shown(&now),
            c.content,
            c.ttl,
            c.api
        )])
    }

    fn run(ctx: Context) -> Result<Outcome, StepError> {
        let c = parse(&ctx.config)?;
        let before = c.current()?;
        let body = format!(
            r#"{{"rrsets":[{{"name":{},"type":{},"ttl":{},"changetype":"REPLACE","records":[{{"content":{},"disabled":false}}]}}]}}"#,
            kit::json_string(&c.name),
            kit::json_string(&c.rtype),
            c.ttl,
            kit::json_string(&c.content)
        );
        let (status, resp) = c.request("PATCH", body.into_bytes())?;
        match status {
            200..=299 => {}
            s if s >= 500 => return Err(StepError::Retryable(format!("PowerDNS answered {s} to the change"))),
            s => {
                return Err(StepError::Failed(format!(
                    "PowerDNS refused the change ({s}): {}",
                    String::from_utf8_lossy(&resp).chars().take(300).collect::<String>()
                )))
            }
        }
        Ok(Outcome {
            summary: format!("{} {} now points at {} (was {})", c.name, c.rtype, c.content, c.shown(&before)),
            facts: vec![
                ("dns-name".into(), c.name.clone()),
                ("dns-content".into(), c.content.clone()),
                ("dns-previous".into(), before.join(",")),
            ],
        })
    }

    fn verify(ctx: Context) -> Result<Outcome, StepError> {
        let c = parse(&ctx.config)?;
        let now = c.current()?;
        if now != [c.content.clone()] {
            return Err(StepError::Failed(format!(
                "{} {} points at {}, not {}",
                c.name,
                c.rtype,
                c.shown(&now),
                c.content
            )));
        }
        Ok(Outcome { summary: format!("{} {} = {}", c.name, c.rtype, c.content), facts: vec![] })
    }
}
