//! PostgreSQL connection strings as a DBA writes them: a literal DSN when it holds no
//! password (peer or certificate authentication, `host=/var/run/postgresql`), a secret
//! reference (`env:`/`file:`) when it does; completed the way libpq completes one: `PG*`
//! environment variables for what it leaves out, then `PGPASSFILE` or `~/.pgpass`.

use crate::error::{Error, Result};
use crate::secret::SecretRef;
use serde::{Deserialize, Deserializer};
use std::fmt;
use std::path::{Path, PathBuf};
use tokio_postgres::config::Host;

/// A DSN from a policy, a runbook or the command line.
#[derive(Clone, PartialEq, Eq)]
pub enum Dsn {
    /// Holds no password: not a secret, shown as it is.
    Literal(String),
    /// May hold a password: read when needed, shown as its reference.
    Secret(SecretRef),
}

impl Dsn {
    /// `env:NAME` / `file:/path`, or a literal DSN that holds no password. The error for a
    /// literal with a password never repeats the text.
    pub fn parse(s: &str) -> std::result::Result<Dsn, String> {
        if s.starts_with("env:") || s.starts_with("file:") {
            return SecretRef::parse(s).map(Dsn::Secret);
        }
        let cfg: tokio_postgres::Config = s
            .parse()
            .map_err(|_| "not a valid PostgreSQL connection string (key=value pairs or a postgresql:// URL)")?;
        if cfg.get_password().is_some() {
            return Err("this DSN holds a password, so it is a secret: put it in the environment or a file \
                 and write `env:NAME` or `file:/path` (or leave the password to ~/.pgpass or PGPASSWORD)"
                .into());
        }
        Ok(Dsn::Literal(s.to_string()))
    }

    /// The text, read from its reference if need be.
    pub fn resolve(&self) -> Result<String> {
        match self {
            Dsn::Literal(s) => Ok(s.clone()),
            Dsn::Secret(r) => r.resolve(),
        }
    }

    /// The connection as libpq would make it: the DSN, then `PG*` variables for what it
    /// leaves out, then the password from the password file.
    pub fn config(&self) -> Result<tokio_postgres::Config> {
        let text = self.resolve()?;
        let cfg: tokio_postgres::Config = text
            .parse()
            .map_err(|_| Error::policy(format!("the DSN in {self} is not a valid PostgreSQL connection string")))?;
        Ok(complete(cfg, &|k| std::env::var(k).ok()))
    }
}

/// Fill in what libpq would: `PGHOST`, `PGPORT`, `PGUSER`, `PGDATABASE`, `PGPASSWORD`,
/// `PGAPPNAME`, `PGCONNECT_TIMEOUT`, the default socket directory, then the password file.
pub fn complete(mut cfg: tokio_postgres::Config, env: &dyn Fn(&str) -> Option<String>) -> tokio_postgres::Config {
    if cfg.get_hosts().is_empty() && cfg.get_hostaddrs().is_empty() {
        match env("PGHOST") {
            Some(h) if !h.is_empty() => {
                for h in h.split(',') {
                    if h.starts_with('/') {
                        cfg.host_path(h);
                    } else {
                        cfg.host(h);
                    }
                }
            }
            // libpq as Debian builds it: the socket in /var/run/postgresql.
            _ => {
                cfg.host_path(default_socket_dir());
            }
        }
    }
    if cfg.get_ports().is_empty() {
        if let Some(p) = env("PGPORT").and_then(|p| p.parse::<u16>().ok()) {
            cfg.port(p);
        }
    }
    if cfg.get_user().is_none() {
        if let Some(u) = env("PGUSER").filter(|u| !u.is_empty()) {
            cfg.user(u);
        } else if let Some(u) = nix::unistd::User::from_uid(nix::unistd::geteuid()).ok().flatten() {
            cfg.user(u.name);
        }
    }
    if cfg.get_dbname().is_none() {
        if let Some(d) = env("PGDATABASE").filter(|d| !d.is_empty()) {
            cfg.dbname(d);
        }
    }
    if cfg.get_application_name().is_none() {
        cfg.application_name(env("PGAPPNAME").unwrap_or_else(|| "veza-dr".into()));
    }
    if cfg.get_connect_timeout().is_none() {
        if let Some(t) = env("PGCONNECT_TIMEOUT").and_then(|t| t.parse::<u64>().ok()).filter(|t| *t > 0) {
            cfg.connect_timeout(std::time::Duration::from_secs(t));
        }
    }
    if cfg.get_password().is_none() {
        if let Some(pw) = env("PGPASSWORD").filter(|p| !p.is_empty()) {
            cfg.password(pw);
        } else if let Some(pw) = passfile(env).and_then(|f| lookup(&f, &cfg)) {
            cfg.password(pw);
        }
    }
    cfg
}

fn default_socket_dir() -> &'static str {
    if Path::new("/var/run/postgresql").is_dir() {
        "/var/run/postgresql"
    } else {
        "/tmp"
    }
}

/// `PGPASSFILE`, else `~/.pgpass`.
fn passfile(env: &dyn Fn(&str) -> Option<String>) -> Option<PathBuf> {
    if let Some(f) = env("PGPASSFILE").filter(|f| !f.is_empty()) {
        return Some(f.into());
    }
    let home = env("HOME").or_else(|| {
        nix::unistd::User::from_uid(nix::unistd::geteuid()).ok().flatten().map(|u| u.dir.display().to_string())
    })?;
    Some(Path::new(&home).join(".pgpass"))
}

/// The password file's first line matching the connection, as libpq reads it: fields
/// `host:port:database:user:password`, `*` matching anything, `\:` and `\\` escaped; a file
/// that group or others can read is ignored (with a warning), as libpq does.
fn lookup(file: &Path, cfg: &tokio_postgres::Config) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(file).ok()?;
    if meta.mode() & 0o077 != 0 {
        tracing::warn!(file = %file.display(), "password file has group or world access; ignored (chmod 0600 it)");
        return None;
    }
    let text = std::fs::read_to_string(file).ok()?;
    let host = match cfg.get_hosts().first() {
        Some(Host::Tcp(h)) => h.clone(),
        Some(Host::Unix(p)) if p == Path::new(default_socket_dir()) => "localhost".into(),
        Some(Host::Unix(p)) => p.display().to_string(),
        None => "localhost".into(),
    };
    let port = cfg.get_ports().first().copied().unwrap_or(5432).to_string();
    let user = cfg.get_user().unwrap_or_default().to_string();
    let db = cfg.get_dbname().map(str::to_string).unwrap_or_else(|| user.clone());
    let wanted = [host.as_str(), port.as_str(), db.as_str(), user.as_str()];
    text.lines().filter(|l| !l.trim_start().starts_with('#')).find_map(|line| {
        let f = fields(line);
        if f.len() < 5 {
            return None;
        }
        let hit = f.iter().zip(wanted).all(|(have, want)| have == "*" || have == want);
        // The password is the rest of the line, colons and all once unescaped.
        hit.then(|| f[4..].join(":"))
    })
}

fn fields(line: &str) -> Vec<String> {
    let mut out = vec![String::new()];
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                if let Some(n) = chars.next() {
                    out.last_mut().expect("one field").push(n);
                }
            }
            ':' => out.push(String::new()),
            c => out.last_mut().expect("one field").push(c),
        }
    }
    out
}

impl fmt::Display for Dsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Dsn::Literal(s) => write!(f, "DSN `{s}`"),
            Dsn::Secret(r) => write!(f, "{r}"),
        }
    }
}

impl fmt::Debug for Dsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl<'de> Deserialize<'de> for Dsn {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Dsn::parse(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn literal_dsns_without_password_are_accepted_with_one_they_are_refused_unechoed() {
        assert!(matches!(Dsn::parse("host=/var/run/postgresql dbname=postgres"), Ok(Dsn::Literal(_))));
        assert!(matches!(Dsn::parse("postgresql://app@db.internal/app"), Ok(Dsn::Literal(_))));
        assert!(matches!(Dsn::parse("env:PG_DSN"), Ok(Dsn::Secret(_))));
        for bad in ["host=h password=hunter2", "postgresql://u:hunter2@h/db"] {
            let e = Dsn::parse(bad).unwrap_err();
            assert!(e.contains("env:NAME") && !e.contains("hunter2"), "{e}");
        }
        assert!(Dsn::parse("not a dsn at all ===").is_err());
    }

    #[test]
    fn pg_variables_fill_only_what_the_dsn_leaves_out_and_pgpass_gives_the_password() {
        let dir = tempfile::tempdir().unwrap();
        let pass = dir.path().join("pgpass");
        std::fs::write(
            &pass,
            "# comment\nother:5432:*:app:nope\ndb1:6543:sales:app:pa\\:ss\\\\word\n*:*:*:*:fallback\n",
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&pass, std::fs::Permissions::from_mode(0o600)).unwrap();
        let vars: HashMap<&str, String> = [
            ("PGHOST", "db1".to_string()),
            ("PGPORT", "6543".into()),
            ("PGUSER", "app".into()),
            ("PGDATABASE", "ignored".into()),
            ("PGPASSFILE", pass.display().to_string()),
        ]
        .into();
        let env = |k: &str| vars.get(k).cloned();
        let c = complete("dbname=sales".parse().unwrap(), &env);
        assert_eq!(c.get_hosts(), &[Host::Tcp("db1".into())]);
        assert_eq!(c.get_ports(), &[6543]);
        assert_eq!(c.get_user(), Some("app"));
        assert_eq!(c.get_dbname(), Some("sales"));
        assert_eq!(c.get_password(), Some(&b"pa:ss\\word"[..]));
        // The DSN wins over the environment; the wildcard line matches what is left.
        let c = complete("host=other port=7000 user=x dbname=y".parse().unwrap(), &env);
        assert_eq!(c.get_ports(), &[7000]);
        assert_eq!(c.get_password(), Some(&b"fallback"[..]));
        // A password file others can read is ignored, as libpq ignores it.
        std::fs::set_permissions(&pass, std::fs::Permissions::from_mode(0o644)).unwrap();
        let c = complete("dbname=sales".parse().unwrap(), &env);
        assert_eq!(c.get_password(), None);
    }
}
