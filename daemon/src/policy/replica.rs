//! `[[replica]]`: second repositories (a DR region) that `veza-dr replicate` fills with copies
//! of the primary's objects, and that every reading command can use with `--repository NAME`.
//! A replica takes the primary's layout settings (pack size, compression): it holds the same
//! objects, byte for byte.

use super::{Policy, RepositoryCfg};
use crate::error::{Error, Result};
use crate::secret::SecretRef;
use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub(super) struct ReplicaFile {
    name: String,
    url: String,
    endpoint: Option<String>,
    region: Option<String>,
    access_key_id: Option<SecretRef>,
    secret_access_key: Option<SecretRef>,
    session_token: Option<SecretRef>,
    #[serde(default)]
    options: std::collections::BTreeMap<String, String>,
}

/// A replica: its name and where it is.
#[derive(Debug, Clone)]
pub struct Replica {
    pub name: String,
    pub repository: RepositoryCfg,
}

/// The name `--repository` gives the primary.
pub const PRIMARY: &str = "primary";

fn same_location(a: &str, b: &str) -> bool {
    a.trim_end_matches('/') == b.trim_end_matches('/')
}

/// Check and build the replicas; `at` turns a span into a `file:line:col` error.
pub(super) fn build(
    files: Vec<toml::Spanned<ReplicaFile>>,
    primary: &RepositoryCfg,
    at: &dyn Fn(std::ops::Range<usize>, String) -> Error,
) -> Result<Vec<Replica>> {
    let mut out: Vec<Replica> = Vec::new();
    for f in files {
        let span = f.span();
        let r = f.into_inner();
        if r.name.is_empty()
            || r.name == PRIMARY
            || !r.name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(at(
                span,
                format!("replica name `{}` must be letters, digits, `-` and `_`, and not `{PRIMARY}`", r.name),
            ));
        }
        if out.iter().any(|o| o.name == r.name) {
            return Err(at(span, format!("replica `{}` is declared twice", r.name)));
        }
        if same_location(&r.url, &primary.url) && r.endpoint == primary.endpoint {
            return Err(at(span, format!("replica `{}` has the primary's url: a replica must be elsewhere", r.name))
                .with_hint("point it at a bucket in another region"));
        }
        if let Some(o) =
            out.iter().find(|o| same_location(&o.repository.url, &r.url) && o.repository.endpoint == r.endpoint)
        {
            return Err(at(span, format!("replicas `{}` and `{}` are the same location", o.name, r.name)));
        }
        match url::Url::parse(&r.url) {
            Ok(u) if matches!(u.scheme(), "s3" | "file" | "gs" | "az" | "azure" | "abfs" | "abfss") => {}
            Ok(u) => {
                return Err(at(span, format!("replica `{}`: url scheme `{}` is not supported", r.name, u.scheme())))
            }
            Err(e) => return Err(at(span, format!("replica `{}`: url `{}` is invalid: {e}", r.name, r.url))),
        }
        if let Some(ep) = &r.endpoint {
            url::Url::parse(ep)
                .map_err(|e| at(span.clone(), format!("replica `{}`: endpoint `{ep}` is invalid: {e}", r.name)))?;
        }
        let repository = RepositoryCfg {
            url: r.url,
            endpoint: r.endpoint,
            region: r.region,
            access_key_id: r.access_key_id,
            secret_access_key: r.secret_access_key,
            session_token: r.session_token,
            options: r.options,
            ..primary.clone()
        };
        out.push(Replica { name: r.name, repository });
    }
    Ok(out)
}

impl Policy {
    /// This policy reading from repository `name` (`primary` or a replica's name): the same
    /// policy with that repository, remembered in `via` (restore_command passes it on).
    pub fn on_repository(&self, name: &str) -> Result<Policy> {
        if name == PRIMARY {
            return Ok(self.clone());
        }
        let r = self.replicas.iter().find(|r| r.name == name).ok_or_else(|| {
            let known: Vec<&str> =
                std::iter::once(PRIMARY).chain(self.replicas.iter().map(|r| r.name.as_str())).collect();
            Error::usage(format!("policy {} has no repository `{name}`", self.name))
                .with_hint(format!("its repositories: {}", known.join(", ")))
        })?;
        let mut p = self.clone();
        p.repository = r.repository.clone();
        p.via = Some(r.name.clone());
        Ok(p)
    }
}

#[cfg(test)]
mod tests {
    use crate::policy::Policy;
    use std::path::Path;

    fn policy(replicas: &str) -> crate::Result<Policy> {
        let (_, r) = crate::crypto::seal::generate_identity();
        let text = format!(
            "[source]\ntype = \"volume\"\npath = \"/srv\"\n[repository]\nurl = \"s3://b/p\"\nendpoint = \"http://127.0.0.1:9000\"\n[encryption]\nrecipients = [\"{r}\"]\n{replicas}"
        );
        Policy::parse(Path::new("p.toml"), &text)
    }

    #[test]
    fn replicas_are_checked_with_their_position_and_read_through_on_repository() {
        let dr = "[[replica]]\nname = \"dr\"\nurl = \"s3://b-dr/p\"\nendpoint = \"http://127.0.0.1:9001\"\n";
        let p = policy(dr).unwrap();
        let v = p.on_repository("dr").unwrap();
        assert_eq!((v.repository.url.as_str(), v.via.as_deref()), ("s3://b-dr/p", Some("dr")));
        assert_eq!(v.repository.pack_size.0, p.repository.pack_size.0, "layout settings follow the primary");
        assert!(p.on_repository("primary").unwrap().via.is_none());
        let e = p.on_repository("nope").unwrap_err();
        assert!(e.hint.unwrap().contains("primary, dr"));
        for (bad, want) in [
            (
                "[[replica]]\nname = \"dr\"\nurl = \"s3://b/p/\"\nendpoint = \"http://127.0.0.1:9000\"\n",
                "p.toml:9:1: replica `dr` has the primary's url",
            ),
            (&format!("{dr}{dr}"), "replica `dr` is declared twice"),
            ("[[replica]]\nname = \"primary\"\nurl = \"s3://x/p\"\n", "not `primary`"),
            ("[[replica]]\nname = \"dr\"\nurl = \"s3://x/p\"\nbucket = \"y\"\n", "unknown field `bucket`"),
        ] {
            let e = policy(bad).unwrap_err();
            assert!(e.message.contains(want), "{want}: {}", e.message);
        }
    }
}
