//! Policies: `policies/*.toml` parsed into validated values.
//!
//! Parsing rejects unknown keys; a bad value is reported as `file:line:col: message` with a hint.
//! A policy's name is its file stem (`policies/db.toml` is policy `db`).

pub mod replica;
pub mod types;

pub use crate::crypto::Recipient;
use crate::error::{Error, Result};
use crate::secret::SecretRef;
use serde::Deserialize;
use std::path::{Path, PathBuf};
pub use types::{CronExpr, Dur, Size};

/// One validated policy.
#[derive(Debug, Clone)]
pub struct Policy {
    pub name: String,
    pub path: PathBuf,
    pub source: Source,
    pub schedule: Schedule,
    pub repository: RepositoryCfg,
    pub encryption: Encryption,
    pub retention: Retention,
    pub objectives: Objectives,
    pub verify: VerifyCfg,
    pub trust: Trust,
    /// Second repositories (`[[replica]]`), filled by `veza-dr replicate`.
    pub replicas: Vec<replica::Replica>,
    /// The replica this view of the policy reads (`--repository NAME`); `None`: the primary.
    pub via: Option<String>,
}

/// The keys a restore-side host trusts: the writers whose snapshots and WAL it restores, and
/// who may sign drill reports (besides this host). Each is `ed25519:<hex>`, as
/// `veza-dr keygen --signing` prints it on that host.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Trust {
    #[serde(default)]
    pub writers: Vec<crate::crypto::signing::PublicKey>,
    #[serde(default)]
    pub report_signers: Vec<crate::crypto::signing::PublicKey>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct PolicyFile {
    #[serde(default)]
    description: Option<String>,
    source: Option<toml::Spanned<SourceFile>>,
    #[serde(default)]
    schedule: Schedule,
    repository: Option<RepositoryCfg>,
    encryption: Option<Encryption>,
    #[serde(default)]
    retention: Retention,
    #[serde(default)]
    objectives: Objectives,
    #[serde(default)]
    verify: VerifyCfg,
    #[serde(default)]
    trust: Trust,
    #[serde(default)]
    runbook: Vec<toml::Spanned<crate::runbook::spec::RunbookSpec>>,
    #[serde(default)]
    replica: Vec<toml::Spanned<replica::ReplicaFile>>,
}

/// What one policy file declares: a backup policy, runbooks, or both.
#[derive(Debug, Clone)]
pub struct Document {
    pub policy: Option<Policy>,
    pub runbooks: Vec<crate::runbook::spec::RunbookSpec>,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
enum SourceType {
    Volume,
    Postgres,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct SourceFile {
    #[serde(rename = "type")]
    kind: SourceType,
    // volume
    path: Option<PathBuf>,
    #[serde(default)]
    exclude: Vec<String>,
    // postgres
    method: Option<PgMethod>,
    dsn: Option<crate::source::postgres::Dsn>,
    data_dir: Option<PathBuf>,
    #[serde(default)]
    databases: Vec<String>,
    bin_dir: Option<PathBuf>,
}

/// What kind of source a policy declares and a snapshot holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SourceKind {
    Volume,
    PostgresPhysical,
    PostgresLogical,
}

impl SourceKind {
    pub fn as_str(self) -> &'static str {
        match self {
            SourceKind::Volume => "volume",
            SourceKind::PostgresPhysical => "postgres-physical",
            SourceKind::PostgresLogical => "postgres-logical",
        }
    }
}

/// What is backed up.
#[derive(Debug, Clone)]
pub enum Source {
    Volume(VolumeSource),
    Postgres(PgSource),
}

#[derive(Debug, Clone)]
pub struct VolumeSource {
    pub path: PathBuf,
    pub exclude: Vec<String>,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum PgMethod {
    Physical,
    Logical,
}

#[derive(Debug, Clone)]
pub struct PgSource {
    pub method: PgMethod,
    pub dsn: crate::source::postgres::Dsn,
    pub data_dir: Option<PathBuf>,
    pub databases: Vec<String>,
    pub bin_dir: PathBuf,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Schedule {
    pub full: Option<CronExpr>,
    pub incremental: Option<CronExpr>,
    pub verify: Option<CronExpr>,
    pub prune: Option<CronExpr>,
    /// Catch-up copy to every `[[replica]]` of what it lacks.
    pub replicate: Option<CronExpr>,
    /// A drill of every `[[replica]]`, from the replica alone: the region path, proven.
    pub drill_replicas: Option<CronExpr>,
    pub timezone: Option<String>,
    pub jitter: Option<Dur>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct RepositoryCfg {
    pub url: String,
    pub endpoint: Option<String>,
    pub region: Option<String>,
    pub access_key_id: Option<SecretRef>,
    pub secret_access_key: Option<SecretRef>,
    pub session_token: Option<SecretRef>,
    /// Extra object_store options for gs:// and az:// (e.g. `google_service_account`).
    #[serde(default)]
    pub options: std::collections::BTreeMap<String, String>,
    #[serde(default = "default_pack_size")]
    pub pack_size: Size,
    #[serde(default = "default_level")]
    pub compression_level: i32,
    #[serde(default = "default_uploads")]
    pub upload_concurrency: usize,
}

fn default_pack_size() -> Size {
    Size(16 << 20)
}
fn default_level() -> i32 {
    1
}
fn default_uploads() -> usize {
    3
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Encryption {
    pub recipients: Vec<Recipient>,
    /// Only for restore-side copies of a policy: where the private identity is.
    pub identity: Option<SecretRef>,
}

impl Encryption {
    /// The restore-side identity when it is a file (`identity = "file:/path"`).
    pub fn identity_file(&self) -> Option<&Path> {
        match &self.identity {
            Some(SecretRef::File(f)) => Some(f),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Retention {
    pub keep_last: Option<u32>,
    pub keep_hourly: Option<u32>,
    pub keep_daily: Option<u32>,
    pub keep_weekly: Option<u32>,
    pub keep_monthly: Option<u32>,
    pub keep_yearly: Option<u32>,
    pub keep_within: Option<Dur>,
    /// Packs marked unreferenced are deleted only after this long (two-phase prune).
    pub prune_grace: Option<Dur>,
}

/// Without `prune-grace`: a day.
pub const DEFAULT_PRUNE_GRACE: std::time::Duration = std::time::Duration::from_secs(24 * 3600);
/// The shortest grace prune applies, whatever the policy says: a backup (or a host with a
/// lost lease) that reuses a pack marked a moment ago still finds it for this long, and a
/// commit older than the grace is refused. `VEZA_DR_MIN_PRUNE_GRACE` lowers it for tests.
pub const MIN_PRUNE_GRACE: std::time::Duration = std::time::Duration::from_secs(15 * 60);

impl Retention {
    /// The grace prune applies: the policy's, never below the floor.
    pub fn grace(&self) -> std::time::Duration {
        let floor = std::env::var("VEZA_DR_MIN_PRUNE_GRACE")
            .ok()
            .and_then(|s| humantime::parse_duration(&s).ok())
            .unwrap_or(MIN_PRUNE_GRACE);
        self.prune_grace.map(|d| d.0).unwrap_or(DEFAULT_PRUNE_GRACE).max(floor)
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Objectives {
    pub rpo: Option<Dur>,
    pub rto: Option<Dur>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct VerifyCfg {
    #[serde(default)]
    pub check: Vec<Check>,
    /// Also drill a randomly chosen older snapshot (a second report).
    #[serde(default)]
    pub random_older: bool,
    /// A drill that runs longer fails, naming the phase it was in (default: twice the RTO
    /// objective, or 24h without one).
    pub time_limit: Option<Dur>,
    /// Port of the drill's throw-away server (default: a free one).
    pub port: Option<u16>,
    /// Runbooks whose dry run (`plan`) the drill rehearses, after the restore test.
    #[serde(default)]
    pub rehearse: Vec<String>,
}

/// A drill check: `sql` on the restored server, or a shell `command` (run in the restored tree
/// for volumes; with PGHOST/PGPORT/PGUSER/PGPASSWORD of the drill server for PostgreSQL).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Check {
    pub name: Option<String>,
    pub sql: Option<String>,
    /// The database `sql` runs in (default `postgres`).
    pub database: Option<String>,
    pub command: Option<String>,
    pub expect: Option<toml::Value>,
}

impl Policy {
    /// Parse a policy from its text; `path` is used in messages and for the name.
    pub fn parse(path: &Path, text: &str) -> Result<Policy> {
        let doc = parse_document(path, text)?;
        doc.policy.ok_or_else(|| {
            Error::policy(format!("{}: declares only runbooks, no backup policy ([source])", path.display()))
                .with_hint("name a policy file with a [source], [repository] and [encryption]")
        })
    }
}

/// Parse a policy file: its backup policy (if it has a `[source]`) and its `[[runbook]]`s.
pub fn parse_document(path: &Path, text: &str) -> Result<Document> {
    let name = policy_name(path)?;
    let toml_error = |e: toml::de::Error| {
        let (line, col) = e.span().map(|s| line_col(text, s.start)).unwrap_or((1, 1));
        let msg = e.message().trim().replace('\n', " ");
        Error::policy(format!("{}:{line}:{col}: {msg}", path.display()))
            .with_hint("see the policy reference in README.md; keys are kebab-case")
    };
    let file: PolicyFile = toml::from_str(text).map_err(toml_error)?;
    let at = |span: std::ops::Range<usize>, msg: String| {
        let (line, col) = line_col(text, span.start);
        Error::policy(format!("{}:{line}:{col}: {msg}", path.display()))
    };
    let mut runbooks = Vec::new();
    for rb in &file.runbook {
        let spec = rb.get_ref().clone();
        spec.validate().map_err(|m| at(rb.span(), format!("runbook `{}`: {m}", spec.name)))?;
        if runbooks.iter().any(|r: &crate::runbook::spec::RunbookSpec| r.name == spec.name) {
            return Err(at(rb.span(), format!("runbook `{}` is declared twice", spec.name)));
        }
        runbooks.push(spec);
    }
    let backup_parts = file.source.is_some() || file.repository.is_some() || file.encryption.is_some();
    let policy = if backup_parts || runbooks.is_empty() {
        let missing = |key: &str| {
            Error::policy(format!("{}:1:1: missing field `{key}`", path.display()))
                .with_hint("a backup policy needs [source], [repository] and [encryption]")
        };
        let source = file.source.clone().ok_or_else(|| missing("source"))?;
        let repository = file.repository.clone().ok_or_else(|| missing("repository"))?;
        let encryption = file.encryption.clone().ok_or_else(|| missing("encryption"))?;
        Some(Policy::build(path, text, name, file, source, repository, encryption)?)
    } else {
        None
    };
    Ok(Document { policy, runbooks })
}

impl Policy {
    fn build(
        path: &Path,
        text: &str,
        name: String,
        file: PolicyFile,
        source: toml::Spanned<SourceFile>,
        repository: RepositoryCfg,
        encryption: Encryption,
    ) -> Result<Policy> {
        let at = |span: std::ops::Range<usize>, msg: String| {
            let (line, col) = line_col(text, span.start);
            Error::policy(format!("{}:{line}:{col}: {msg}", path.display()))
        };
        let span = source.span();
        let s = source.into_inner();
        let source = match s.kind {
            SourceType::Volume => {
                let p = s.path.ok_or_else(|| at(span.clone(), "a volume source needs `path`".into()))?;
                if !p.is_absolute() {
                    return Err(at(span, format!("volume path `{}` must be absolute", p.display())));
                }
                for g in &s.exclude {
                    globset::Glob::new(g)
                        .map_err(|e| at(span.clone(), format!("exclude pattern `{g}` is invalid: {e}")))?;
                }
                Source::Volume(VolumeSource { path: p, exclude: s.exclude })
            }
            SourceType::Postgres => {
                let dsn = s.dsn.ok_or_else(|| {
                    at(span.clone(), "a postgres source needs `dsn` (`host=/var/run/postgresql dbname=postgres`, or a reference such as `env:VEZA_PG_DSN` when it holds a password)".into())
                })?;
                let method = s.method.unwrap_or(PgMethod::Physical);
                if method == PgMethod::Physical && s.data_dir.is_none() {
                    return Err(at(span, "a physical postgres source needs `data-dir`".into()));
                }
                Source::Postgres(PgSource {
                    method,
                    dsn,
                    data_dir: s.data_dir,
                    databases: s.databases,
                    bin_dir: s.bin_dir.unwrap_or_else(|| "/usr/lib/postgresql/15/bin".into()),
                })
            }
        };
        let mut schedule = file.schedule;
        if let Some(tz) = schedule.timezone.clone() {
            let zone: chrono_tz::Tz = tz.parse().map_err(|_| {
                let off = text.find("timezone").unwrap_or(0);
                let (line, col) = line_col(text, off);
                Error::policy(format!("{}:{line}:{col}: unknown timezone `{tz}`", path.display()))
                    .with_hint("use an IANA name such as `UTC` or `Europe/Paris`")
            })?;
            for c in [
                &mut schedule.full,
                &mut schedule.incremental,
                &mut schedule.verify,
                &mut schedule.prune,
                &mut schedule.replicate,
                &mut schedule.drill_replicas,
            ]
            .into_iter()
            .flatten()
            {
                c.tz = zone;
            }
        }
        let replicas = replica::build(file.replica, &repository, &at)?;
        let policy = Policy {
            name,
            path: path.to_path_buf(),
            source,
            schedule,
            replicas,
            via: None,
            repository,
            encryption,
            retention: file.retention,
            objectives: file.objectives,
            verify: file.verify,
            trust: file.trust,
        };
        let _ = file.description;
        policy.validate(text)?;
        Ok(policy)
    }

    /// Checks across fields that serde cannot express.
    fn validate(&self, text: &str) -> Result<()> {
        let here = |key: &str, msg: String| {
            let off = text.find(key).unwrap_or(0);
            let (line, col) = line_col(text, off);
            Error::policy(format!("{}:{line}:{col}: {msg}", self.path.display()))
        };
        if self.encryption.recipients.is_empty() {
            return Err(here(
                "recipients",
                "`encryption.recipients` is empty: backups need at least one public key".into(),
            )
            .with_hint("create one with `veza-dr keygen -o restore.key` and paste the printed `age1…` recipient"));
        }
        let r = &self.repository;
        let url = url::Url::parse(&r.url).map_err(|e| {
            here("url", format!("repository url `{}` is invalid: {e}", r.url))
                .with_hint("write e.g. `s3://bucket/prefix` or `file:///var/backups/veza`")
        })?;
        if !matches!(url.scheme(), "s3" | "file" | "gs" | "az" | "azure" | "abfs" | "abfss" | "memory") {
            return Err(here("url", format!("repository url scheme `{}` is not supported", url.scheme()))
                .with_hint("use s3://, file://, gs:// or az://"));
        }
        if let Some(ep) = &r.endpoint {
            url::Url::parse(ep).map_err(|e| here("endpoint", format!("endpoint `{ep}` is invalid: {e}")))?;
        }
        if !(1..=22).contains(&r.compression_level) {
            return Err(here(
                "compression-level",
                format!("compression-level {} is out of range 1..=22", r.compression_level),
            ));
        }
        if !(1 << 20..=1 << 30).contains(&r.pack_size.0) {
            return Err(here("pack-size", "pack-size must be between 1MiB and 1GiB".into()));
        }
        for (i, c) in self.verify.check.iter().enumerate() {
            let name = c.name.clone().unwrap_or_else(|| format!("check {}", i + 1));
            match (&c.sql, &c.command) {
                (Some(_), Some(_)) | (None, None) => {
                    return Err(here("[[verify.check]]", format!("{name}: give either `sql` or `command`")))
                }
                (Some(_), None) if self.volume().is_some() => {
                    return Err(here(
                        "[[verify.check]]",
                        format!("{name}: a volume drill has no database; use `command`"),
                    )
                    .with_hint("a command runs in the restored tree, e.g. command = \"test -s config/app.yaml\""))
                }
                (None, Some(_)) if c.expect.is_some() => {
                    return Err(here(
                        "[[verify.check]]",
                        format!("{name}: `expect` applies to `sql`; a command passes by exiting 0"),
                    ))
                }
                _ => {}
            }
        }
        if self.schedule.replicate.is_some() && self.replicas.is_empty() {
            return Err(here("replicate", "`schedule.replicate` is set but the policy declares no [[replica]]".into())
                .with_hint("add a [[replica]] table, or remove the schedule"));
        }
        if self.schedule.drill_replicas.is_some() && self.replicas.is_empty() {
            return Err(here(
                "drill-replicas",
                "`schedule.drill-replicas` is set but the policy declares no [[replica]]".into(),
            )
            .with_hint("add a [[replica]] table, or remove the schedule"));
        }
        if r.upload_concurrency == 0 || r.upload_concurrency > 64 {
            return Err(here("upload-concurrency", "upload-concurrency must be between 1 and 64".into()));
        }
        Ok(())
    }

    pub fn volume(&self) -> Option<&VolumeSource> {
        match &self.source {
            Source::Volume(v) => Some(v),
            _ => None,
        }
    }
}

fn policy_name(path: &Path) -> Result<String> {
    let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or("");
    if stem.is_empty() || !stem.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
        return Err(Error::policy(format!(
            "{}: policy file names must be made of letters, digits, `-` and `_`",
            path.display()
        )));
    }
    Ok(stem.to_string())
}

/// 1-based line and column (in characters) of a byte offset.
pub fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().map(|l| l.chars().count()).unwrap_or(0) + 1;
    (line, col)
}

/// Load one policy file.
pub fn load_file(path: &Path) -> Result<Policy> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io("read policy", path, e))?;
    Policy::parse(path, &text)
}

/// Every `*.toml` in `dir`, sorted by name. Each result is the policy or its error; files that
/// declare only runbooks are left out.
pub fn load_dir(dir: &Path) -> Result<Vec<Result<Policy>>> {
    Ok(load_documents(dir)?.into_iter().filter_map(|(_, d)| d.map(|d| d.policy).transpose()).collect())
}

/// Every `*.toml` in `dir`, sorted by name, with what it declares or its error.
pub fn load_documents(dir: &Path) -> Result<Vec<(PathBuf, Result<Document>)>> {
    let rd = std::fs::read_dir(dir).map_err(|e| {
        Error::io("read policies directory", dir, e).with_hint("pass --policies DIR or set VEZA_DR_POLICIES")
    })?;
    let mut paths: Vec<PathBuf> =
        rd.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| p.extension().is_some_and(|x| x == "toml")).collect();
    paths.sort();
    Ok(paths.into_iter().map(|p| (p.clone(), load_document(&p))).collect())
}

/// Load one policy file with its runbooks.
pub fn load_document(path: &Path) -> Result<Document> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io("read policy", path, e))?;
    parse_document(path, &text)
}

/// Find a policy by name in `dir`, or load it directly if `name` is a path to a `.toml` file.
pub fn find(dir: &Path, name: &str) -> Result<Policy> {
    if name.ends_with(".toml") {
        return load_file(Path::new(name));
    }
    let path = dir.join(format!("{name}.toml"));
    if !path.exists() {
        let known: Vec<String> = std::fs::read_dir(dir)
            .map(|rd| {
                let mut v: Vec<String> = rd
                    .filter_map(|e| e.ok())
                    .filter_map(|e| e.path().file_stem().map(|s| s.to_string_lossy().into_owned()))
                    .collect();
                v.sort();
                v
            })
            .unwrap_or_default();
        return Err(Error::not_found(format!("policy `{name}` not found in {}", dir.display())).with_hint(
            if known.is_empty() {
                "pass --policies DIR pointing at a folder of *.toml policies".to_string()
            } else {
                format!("known policies: {}", known.join(", "))
            },
        ));
    }
    load_file(&path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn recipient() -> String {
        age::x25519::Identity::generate().to_public().to_string()
    }

    #[test]
    fn unknown_key_names_file_line_and_column() {
        let text = format!(
            "[source]\ntype = \"volume\"\npath = \"/srv\"\ncolour = \"red\"\n[repository]\nurl = \"file:///tmp/r\"\n[encryption]\nrecipients = [\"{}\"]\n",
            recipient()
        );
        let err = Policy::parse(Path::new("policies/x.toml"), &text).unwrap_err();
        assert!(err.message.starts_with("policies/x.toml:4:1: unknown field `colour`"), "{}", err.message);
        assert_eq!(err.kind.exit_code(), 2);
    }

    #[test]
    fn bad_cron_points_at_the_value() {
        let text = format!(
            "[source]\ntype = \"volume\"\npath = \"/srv\"\n[schedule]\nfull = \"0 3 * *\"\n[repository]\nurl = \"file:///tmp/r\"\n[encryption]\nrecipients = [\"{}\"]\n",
            recipient()
        );
        let err = Policy::parse(Path::new("p.toml"), &text).unwrap_err();
        assert!(err.message.starts_with("p.toml:5:8: cron expression `0 3 * *` has 4 fields"), "{}", err.message);
    }

    #[test]
    fn runbook_only_files_and_runbook_errors_with_position() {
        let ok = "[[runbook]]\nname = \"rb\"\n[[runbook.step]]\nname = \"s\"\nplugin = \"fixture\"\n";
        let doc = parse_document(Path::new("f.toml"), ok).unwrap();
        assert!(doc.policy.is_none());
        assert_eq!(doc.runbooks[0].steps[0].plugin, "fixture");
        let err = Policy::parse(Path::new("f.toml"), ok).unwrap_err();
        assert!(err.message.contains("declares only runbooks"), "{}", err.message);
        let bad = "\n[[runbook]]\nname = \"rb\"\n[[runbook.step]]\nname = \"s\"\nplugin = \"p\"\ngrants = { connections = [\"db\"] }\n";
        let err = parse_document(Path::new("f.toml"), bad).unwrap_err();
        assert!(
            err.message.starts_with(
                "f.toml:2:1: runbook `rb`: step `s` is granted connection `db`, which the runbook does not declare"
            ),
            "{}",
            err.message
        );
        let typo =
            "[[runbook]]\nname = \"rb\"\n[[runbook.step]]\nname = \"s\"\nplugin = \"p\"\non-failure = \"ignore\"\n";
        let err = parse_document(Path::new("f.toml"), typo).unwrap_err();
        assert!(err.message.starts_with("f.toml:6:14: unknown variant `ignore`"), "{}", err.message);
    }

    #[test]
    fn literal_secret_is_refused() {
        let text = format!(
            "[source]\ntype = \"postgres\"\ndsn = \"postgres://u:pw@h/db\"\ndata-dir = \"/d\"\n[repository]\nurl = \"file:///tmp/r\"\n[encryption]\nrecipients = [\"{}\"]\n",
            recipient()
        );
        let err = Policy::parse(Path::new("p.toml"), &text).unwrap_err();
        assert!(err.message.contains("p.toml:3:7: this DSN holds a password, so it is a secret"), "{}", err.message);
        assert!(!err.message.contains("pw@h"), "the secret leaked into the error: {}", err.message);
        // Without a password a literal DSN is fine (peer or certificate authentication).
        let ok = text.replace("postgres://u:pw@h/db", "host=/var/run/postgresql dbname=postgres");
        let p = Policy::parse(Path::new("p.toml"), &ok).unwrap();
        let Source::Postgres(pg) = &p.source else { panic!("a postgres source") };
        assert_eq!(pg.dsn.to_string(), "DSN `host=/var/run/postgresql dbname=postgres`");
    }
}
