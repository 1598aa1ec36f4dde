//! `http-check`: request a URL until it answers the expected status (and, optionally, a body
//! containing a substring), retrying until a deadline. Read-only: `plan` describes, `run` checks.
//!
//! Config: `url` (required), `method` (GET), `expect-status` (200), `body-contains`,
//! `within` (30s, capped by the step's timeout), `interval` (1s), `request-timeout` (5s).

wit_bindgen::generate!({ world: "runbook-step", path: "../../wit" });

use exports::veza::dr::step::Guest;
use veza::dr::host::{self, HttpRequest, Level};
use veza::dr::types::{Context, Description, Grants, Outcome, StepError};

struct Plugin;
export!(Plugin);

const KEYS: &[&str] = &["url", "method", "expect-status", "body-contains", "within", "interval", "request-timeout"];

struct Check {
    url: String,
    method: String,
    status: u16,
    contains: Option<String>,
    within: u64,
    interval: u64,
    request_timeout: u64,
}

fn parse(cfg: &kit::Config) -> Result<Check, StepError> {
    let c = (|| -> Result<Check, String> {
        kit::known_keys(cfg, KEYS)?;
        let url = kit::require(cfg, "url")?.to_string();
        kit::url_authority(&url)?;
        let status = kit::int_or(cfg, "expect-status", 200)?;
        if !(100..=599).contains(&status) {
            return Err(format!("`expect-status` {status} is not an HTTP status"));
        }
        Ok(Check {
            url,
            method: kit::get(cfg, "method").unwrap_or("GET").to_ascii_uppercase(),
            status: status as u16,
            contains: kit::get(cfg, "body-contains").map(str::to_string),
            within: kit::duration_or(cfg, "within", 30_000)?,
            interval: kit::duration_or(cfg, "interval", 1_000)?,
            request_timeout: kit::duration_or(cfg, "request-timeout", 5_000)?,
        })
    })();
    c.map_err(StepError::InvalidConfig)
}

impl Check {
    fn expectation(&self) -> String {
        match &self.contains {
            Some(s) => format!("status {} and a body containing {:?}", self.status, s),
            None => format!("status {}", self.status),
        }
    }
}

impl Guest for Plugin {
    fn describe() -> Description {
        Description {
            name: "http-check".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            summary: "Request a URL until it answers the expected status and body, or a deadline passes".into(),
            needs: Grants { http: vec![], connections: vec![], secrets: vec![] },
            verifies: false,
        }
    }

    fn needs_for(config: Vec<(String, String)>) -> Result<Grants, StepError> {
        let c = parse(&config)?;
        let http = kit::url_authority(&c.url).map_err(StepError::InvalidConfig)?.into_iter().collect();
        Ok(Grants { http, connections: vec![], secrets: vec![] })
    }

    fn validate(config: Vec<(String, String)>) -> Result<(), StepError> {
        parse(&config).map(|_| ())
    }

    fn plan(ctx: Context) -> Result<Vec<String>, StepError> {
        let c = parse(&ctx.config)?;
        let within = c.within.min(ctx.deadline_ms);
        Ok(vec![format!(
            "{} {} every {} ms until it answers {} (at most {} ms)",
            c.method,
            c.url,
            c.interval,
            c.expectation(),
            within
        )])
    }

    fn run(ctx: Context) -> Result<Outcome, StepError> {
        let c = parse(&ctx.config)?;
        let start = host::now_ms();
        let give_up = start + c.within.min(ctx.deadline_ms);
        let mut tries = 0u32;
        loop {
            tries += 1;
            let req = HttpRequest {
                method: c.method.clone(),
                url: c.url.clone(),
                headers: vec![],
                body: vec![],
                timeout_ms: Some(c.request_timeout),
            };
            let last = match host::http(&req) {
                Ok(resp) => {
                    let body = String::from_utf8_lossy(&resp.body);
                    let body_ok = c.contains.as_deref().is_none_or(|s| body.contains(s));
                    if resp.status == c.status && body_ok {
                        let ms = host::now_ms().saturating_sub(start);
                        return Ok(Outcome {
                            summary: format!(
                                "{} {} answered {} after {tries} attempt(s), {ms} ms",
                                c.method,
                                c.url,
                                c.expectation()
                            ),
                            facts: vec![
                                ("http-status".into(), resp.status.to_string()),
                                ("http-attempts".into(), tries.to_string()),
                            ],
                        });
                    }
                    if resp.status != c.status {
                        format!("status {}", resp.status)
                    } else {
                        format!(
                            "status {} but the body does not contain {:?}",
                            resp.status,
                            c.contains.as_deref().unwrap_or("")
                        )
                    }
                }
                Err(StepError::Retryable(e)) => e,
                Err(e) => return Err(e),
            };
            host::log(Level::Info, &format!("attempt {tries}: {last}; want {}", c.expectation()));
            let now = host::now_ms();
            if now + c.interval >= give_up {
                return Err(StepError::Failed(format!(
                    "{} {} did not answer {} within {} ms ({tries} attempts; last: {last})",
                    c.method,
                    c.url,
                    c.expectation(),
                    now.saturating_sub(start)
                )));
            }
            host::sleep_ms(c.interval);
        }
    }

    fn verify(ctx: Context) -> Result<Outcome, StepError> {
        Self::run(ctx)
    }
}
