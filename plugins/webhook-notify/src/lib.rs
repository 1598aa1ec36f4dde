//! `webhook-notify`: post a Slack-compatible JSON message (`{"text": ...}`) to a webhook.
//! The text is a template over the run's facts: `{{runbook}}`, `{{new-timeline}}`, ...
//!
//! Config: `url` (required; usually `${secret:NAME}`, since a webhook URL is a credential),
//! `text` (required template), `username`, `channel`, `icon-emoji`.

wit_bindgen::generate!({ world: "runbook-step", path: "../../wit" });

use exports::veza::dr::step::Guest;
use veza::dr::host::{self, HttpRequest};
use veza::dr::types::{Context, Description, Grants, Outcome, StepError};

struct Plugin;
export!(Plugin);

const KEYS: &[&str] = &["url", "text", "username", "channel", "icon-emoji"];

fn validate(cfg: &kit::Config) -> Result<(), StepError> {
    (|| -> Result<(), String> {
        kit::known_keys(cfg, KEYS)?;
        kit::url_authority(kit::require(cfg, "url")?)?;
        kit::require(cfg, "text")?;
        Ok(())
    })()
    .map_err(StepError::InvalidConfig)
}

/// The name in a `${secret:NAME}` URL.
fn secret_name(url: &str) -> Option<String> {
    url.strip_prefix("${secret:").and_then(|r| r.split_once('}')).map(|(n, _)| n.to_string())
}

fn message(ctx: &Context) -> (String, Vec<u8>) {
    let text = kit::render(kit::get(&ctx.config, "text").unwrap_or(""), &ctx.facts);
    let mut body = format!("{{\"text\":{}", kit::json_string(&text));
    for key in ["username", "channel", "icon-emoji"] {
        if let Some(v) = kit::get(&ctx.config, key) {
            body.push_str(&format!(",{}:{}", kit::json_string(&key.replace('-', "_")), kit::json_string(v)));
        }
    }
    body.push('}');
    (text, body.into_bytes())
}

fn shown(url: &str) -> String {
    match secret_name(url) {
        Some(n) => format!("the webhook in secret `{n}`"),
        None => url.to_string(),
    }
}

impl Guest for Plugin {
    fn describe() -> Description {
        Description {
            name: "webhook-notify".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            summary: "Post a Slack-compatible message built from the run's facts".into(),
            needs: Grants { http: vec![], connections: vec![], secrets: vec![] },
            verifies: false,
        }
    }

    fn needs_for(config: Vec<(String, String)>) -> Result<Grants, StepError> {
        validate(&config)?;
        let url = kit::require(&config, "url").map_err(StepError::InvalidConfig)?;
        Ok(Grants {
            http: kit::url_authority(url).map_err(StepError::InvalidConfig)?.into_iter().collect(),
            connections: vec![],
            secrets: secret_name(url).into_iter().collect(),
        })
    }

    fn validate(config: Vec<(String, String)>) -> Result<(), StepError> {
        validate(&config)
    }

    fn plan(ctx: Context) -> Result<Vec<String>, StepError> {
        validate(&ctx.config)?;
        let (text, _) = message(&ctx);
        Ok(vec![format!("POST to {}: {text:?}", shown(kit::get(&ctx.config, "url").unwrap_or("")))])
    }

    fn run(ctx: Context) -> Result<Outcome, StepError> {
        validate(&ctx.config)?;
        let url = kit::get(&ctx.config, "url").unwrap_or("").to_string();
        let (text, body) = message(&ctx);
        let resp = host::http(&HttpRequest {
            method: "POST".into(),
            url: url.clone(),
            headers: vec![("content-type".into(), "application/json".into())],
            body,
            timeout_ms: Some(10_000),
        })?;
        match resp.status {
            200..=299 => Ok(Outcome {
                summary: format!("notified {}: {text:?}", shown(&url)),
                facts: vec![("notified".into(), "true".into())],
            }),
            429 | 500..=599 => Err(StepError::Retryable(format!("{} answered {}", shown(&url), resp.status))),
            s => Err(StepError::Failed(format!(
                "{} answered {s}: {}",
                shown(&url),
                String::from_utf8_lossy(&resp.body).chars().take(200).collect::<String>()
            ))),
        }
    }

    fn verify(_ctx: Context) -> Result<Outcome, StepError> {
        Ok(Outcome { summary: "nothing to verify".into(), facts: vec![] })
    }
}
