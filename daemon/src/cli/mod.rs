//! The command line: parsing, logging, and turning errors into one line, a hint and an exit
//! code. Each subcommand maps its flags to a job's request and prints the result; decisions
//! live in the jobs.

mod commands;
mod data;
mod demo;
mod failover;
mod health;
mod output;

use crate::error::{Error, Result};
use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;

#[derive(Parser, Debug)]
#[command(
    name = "veza-dr",
    version,
    about = "Backup and disaster recovery for PostgreSQL and volumes",
    propagate_version = true
)]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Args, Debug, Clone)]
pub struct Global {
    /// Directory of policies (*.toml)
    #[arg(long, global = true, env = "VEZA_DR_POLICIES", default_value = "policies")]
    pub policies: PathBuf,
    /// Local state: chunk cache, job history, keys (default /var/lib/veza-dr as root, else XDG)
    #[arg(long, global = true, env = "VEZA_DR_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
    /// Machine-readable output
    #[arg(long, global = true)]
    pub json: bool,
    /// Log format on stderr
    #[arg(long, global = true, value_enum, default_value = "text")]
    pub log_format: LogFormat,
    /// Directory of runbook-step plugins (<name>.wasm)
    #[arg(long, global = true, env = "VEZA_DR_PLUGINS", default_value = "plugins/dist")]
    pub plugins: PathBuf,
    /// Read from this repository: `primary` (the default) or a `[[replica]]` name (snapshots,
    /// restore, verify, prune, drill, drills, wal-fetch, status, check)
    #[arg(long, global = true, value_name = "NAME")]
    pub repository: Option<String>,
    /// How long to wait for a repository lock held by another process
    #[arg(long, global = true, default_value = "0s", value_parser = parse_duration)]
    pub lock_wait: std::time::Duration,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

fn parse_duration(s: &str) -> std::result::Result<std::time::Duration, String> {
    humantime::parse_duration(s).map_err(|e| e.to_string())
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Validate policies
    Policy {
        #[command(subcommand)]
        cmd: PolicyCmd,
    },
    /// Create an age identity for restores; prints its public recipient
    Keygen {
        /// Write the identity here (mode 0600) instead of stdout
        #[arg(short, long)]
        output: Option<PathBuf>,
        /// Print (creating it on first use) the ed25519 key that signs drill reports
        #[arg(long, conflicts_with = "output")]
        signing: bool,
    },
    /// Are we OK? Newest backups, WAL and drills against the objectives, next jobs, sizes
    /// (exit 1 when an objective is breached, naming it)
    Status {
        /// Policies to show (default: every policy in --policies)
        #[arg(value_name = "POLICY")]
        names: Vec<String>,
        /// The running daemon, asked for its next jobs ('' not to ask)
        #[arg(long, env = "VEZA_DR_DAEMON", default_value = "http://127.0.0.1:9187")]
        daemon: String,
    },
    /// Prove a policy's set-up: repository, recipients, PostgreSQL privileges and archiving
    /// end to end (exit 1 when a check fails)
    Check {
        policy: String,
        /// How long a switched WAL segment may take to reach the repository
        #[arg(long, default_value = "60s", value_parser = parse_duration)]
        timeout: std::time::Duration,
    },
    /// Print a shell completion script (e.g. `veza-dr completions bash > /etc/bash_completion.d/veza-dr`)
    Completions { shell: clap_complete::Shell },
    /// Write the man pages (one per command) into DIR
    #[command(hide = true)]
    Man { dir: PathBuf },
    /// Copy to each replica (or one) what it lacks of the primary: ciphertext, no key needed
    Replicate {
        policy: String,
        /// Only this replica
        #[arg(long)]
        replica: Option<String>,
    },
    /// Create a policy's repository (read-only commands never create one)
    Init { policy: String },
    /// Back up a policy's source
    Backup {
        policy: String,
        /// Re-read every file
        #[arg(long, conflicts_with = "incremental")]
        full: bool,
        /// Read only files changed since the parent snapshot (the default when one exists)
        #[arg(long)]
        incremental: bool,
    },
    /// List a policy's snapshots
    Snapshots { policy: String },
    /// Restore a snapshot (PostgreSQL: to a point in time)
    Restore {
        policy: String,
        /// Snapshot id, unique prefix, or `latest` (PostgreSQL: chosen from the recovery target)
        #[arg(long)]
        snapshot: Option<String>,
        /// Directory to restore into (must be empty unless --overwrite)
        #[arg(long, required_unless_present = "target_dsn")]
        target: Option<PathBuf>,
        /// Logical PostgreSQL backups: the server to load the dumps into (or env:NAME)
        #[arg(long, conflicts_with = "target")]
        target_dsn: Option<String>,
        /// Recover to this time: RFC 3339 or PostgreSQL's timestamptz text, as psql prints it
        /// (`2026-12-01 10:02:10.269957+00`); the zone (+HH, +HH:MM, Z, UTC) is required
        #[arg(long, group = "recovery")]
        to_time: Option<String>,
        /// Recover to this LSN
        #[arg(long, group = "recovery")]
        to_lsn: Option<String>,
        /// Recover to this transaction id
        #[arg(long, group = "recovery")]
        to_xid: Option<String>,
        /// Recover to this named restore point
        #[arg(long, group = "recovery")]
        to_name: Option<String>,
        /// Recover only to the end of the backup
        #[arg(long, group = "recovery")]
        immediate: bool,
        /// Start the restored server and wait until recovery has finished
        #[arg(long)]
        start: bool,
        /// Port of the started server
        #[arg(long, default_value_t = 5433)]
        port: u16,
        /// The started server's socket directory (default: /tmp/.veza-dr-PORT, private to
        /// the data directory's owner)
        #[arg(long, requires = "start")]
        socket_dir: Option<PathBuf>,
        /// The started server's listen_addresses (default 127.0.0.1; '' for the socket only)
        #[arg(long, requires = "start")]
        listen: Option<String>,
        /// Parallel jobs for pg_restore
        #[arg(long, default_value_t = 2)]
        jobs: usize,
        /// Restore only these paths (relative to the source root); repeatable
        #[arg(long)]
        include: Vec<PathBuf>,
        /// The private identity file (else VEZA_DR_IDENTITY, else the policy's `identity`)
        #[arg(long)]
        identity: Option<PathBuf>,
        /// Allow restoring into a non-empty directory
        #[arg(long, conflicts_with = "delta")]
        overwrite: bool,
        /// Bring an existing directory (an old copy, a failed primary) to the snapshot: fetch
        /// only the pieces that differ, remove what the snapshot does not hold
        #[arg(long)]
        delta: bool,
        /// With --delta: read and hash every file, even those unchanged (same inode, size,
        /// mtime and ctime) since veza-dr last restored into this directory
        #[arg(long, requires = "delta")]
        checksum: bool,
    },
    /// Check the repository; with --read-data, the data itself
    Verify {
        policy: String,
        #[arg(long)]
        read_data: bool,
        /// With --read-data: percentage of packs to read
        #[arg(long, default_value_t = 100.0)]
        sample: f64,
        #[arg(long)]
        identity: Option<PathBuf>,
    },
    /// Apply retention and delete unreferenced data (two-phase)
    Prune {
        policy: String,
        #[arg(long)]
        dry_run: bool,
    },
    /// archive_command: store one WAL file (exit 0 only once it is durable)
    WalPush { policy: String, path: PathBuf },
    /// restore_command: fetch one WAL file (exit 1 if the repository does not have it)
    WalFetch {
        policy: String,
        segment: String,
        dest: PathBuf,
        #[arg(long)]
        identity: Option<PathBuf>,
        /// Directory for prefetched segments
        #[arg(long)]
        spool: Option<PathBuf>,
        /// How many following segments to prefetch in the background
        #[arg(long, default_value_t = 8)]
        prefetch: usize,
        /// System identifier of the cluster being recovered (default: the only one stored)
        #[arg(long)]
        cluster: Option<u64>,
    },
    #[command(hide = true)]
    WalPrefetch {
        policy: String,
        after: String,
        #[arg(long)]
        spool: PathBuf,
        #[arg(long)]
        identity: PathBuf,
        #[arg(long)]
        cluster: u64,
        #[arg(long, default_value_t = 8)]
        count: usize,
    },
    /// Send the WAL that wal-push queued for the replicas (wal-push starts it detached)
    #[command(hide = true)]
    WalSend { policy: String },
    /// Push the segments waiting in archive_status ahead of archive_command (wal-push starts
    /// it detached)
    #[command(hide = true)]
    WalAhead {
        policy: String,
        #[arg(long)]
        status_dir: PathBuf,
        #[arg(long, default_value = "")]
        after: String,
    },
    /// Compress the segment PostgreSQL is writing ahead of archive_command (wal-push starts it
    /// detached)
    #[command(hide = true)]
    WalTail {
        policy: String,
        #[arg(long)]
        wal_dir: PathBuf,
        #[arg(long)]
        from: String,
        #[arg(long)]
        segment_size: u64,
    },
    /// Run the scheduler: every policy's jobs, /metrics, /healthz, /status
    Daemon {
        /// Address of the HTTP endpoints
        #[arg(long, default_value = "127.0.0.1:9187")]
        listen: std::net::SocketAddr,
        /// Jobs running at once across all policies
        #[arg(long, default_value_t = 2)]
        max_jobs: usize,
        /// On SIGTERM, how long running jobs may take to finish
        #[arg(long, default_value = "10m", value_parser = parse_duration)]
        grace: std::time::Duration,
    },
    /// Restore drill: restore into a sandbox, start, check, measure RTO/RPO, write a signed report
    Drill {
        policy: String,
        #[arg(long)]
        identity: Option<PathBuf>,
        /// Snapshot to drill (default: the newest)
        #[arg(long)]
        snapshot: Option<String>,
        /// Where to write the report (JSON and Markdown)
        #[arg(long, default_value = "drill-reports")]
        report_dir: PathBuf,
    },
    /// Drill history of a policy, from the repository
    Drills { policy: String },
    /// Drill reports
    Report {
        #[command(subcommand)]
        cmd: ReportCmd,
    },
    /// Job history of a policy (from the daemon's local state)
    History { policy: String },
    /// Run a DR runbook: --dry-run shows each step's plan, --yes runs it
    Failover {
        runbook: String,
        /// Call every step's `plan` only; change nothing
        #[arg(long, conflicts_with = "yes")]
        dry_run: bool,
        /// Run without asking
        #[arg(long)]
        yes: bool,
        /// Resume at this step (after a failed run); earlier steps are skipped
        #[arg(long)]
        from: Option<String>,
        /// Audit log (JSON lines; default <state-dir>/runbooks/audit.log)
        #[arg(long)]
        audit_log: Option<PathBuf>,
    },
    /// List runbook-step plugins: what they do, and how long they take to load
    Plugins,
    /// Run the embedded demo: back up a sample tree to a local repository and restore it
    Demo {
        /// Working directory of the demo
        #[arg(long, default_value = "veza-dr-demo")]
        dir: PathBuf,
    },
}

#[derive(Subcommand, Debug)]
pub enum ReportCmd {
    /// Check a report's signature (exit 3 if it was altered)
    Verify { file: PathBuf },
}

#[derive(Subcommand, Debug)]
pub enum PolicyCmd {
    /// Validate every policy in DIR (default: --policies)
    Check { dir: Option<PathBuf> },
}

fn init_logging(cli: &Cli) {
    let g = &cli.global;
    // The daemon logs what it does; one-shot commands only warnings and errors.
    // object_store says at info what it retries (status, attempt, backoff): keep that visible.
    let default =
        if matches!(cli.command, Command::Daemon { .. }) { "info" } else { "warn,object_store::client::retry=info" };
    let filter = tracing_subscriber::EnvFilter::try_from_env("VEZA_DR_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(ansi);
    let daemon = matches!(cli.command, Command::Daemon { .. });
    let _ = match (g.log_format, daemon) {
        (LogFormat::Json, _) => b.json().try_init(),
        (LogFormat::Text, true) => b.try_init(),
        (LogFormat::Text, false) => b.without_time().try_init(),
    };
}

/// Print an error as one line plus a hint; return its exit code.
pub fn report(e: &Error) -> i32 {
    eprintln!("veza-dr: error: {}", e.message);
    if let Some(h) = &e.hint {
        eprintln!("  hint: {h}");
    }
    e.kind.exit_code()
}

pub fn main() -> i32 {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() { 2 } else { 0 };
            let _ = e.print();
            return code;
        }
    };
    init_logging(&cli);
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => return report(&Error::failed(format!("cannot start the runtime: {e}"))),
    };
    match rt.block_on(commands::dispatch(cli)) {
        Ok(code) => code,
        Err(e) => report(&e),
    }
}

pub(crate) fn state_dir(g: &Global) -> PathBuf {
    g.state_dir.clone().unwrap_or_else(crate::repository::state::default_state_dir)
}

/// The policy, viewed through `--repository` when one is given.
pub(crate) fn load_policy(g: &Global, name: &str) -> Result<crate::policy::Policy> {
    let p = crate::policy::find(&g.policies, name)?;
    match &g.repository {
        Some(r) => p.on_repository(r),
        None => Ok(p),
    }
}

/// Writers write to the primary only: a replica is filled by `replicate`.
pub(crate) fn primary_only(g: &Global, command: &str) -> Result<()> {
    match g.repository.as_deref() {
        None | Some(crate::policy::replica::PRIMARY) => Ok(()),
        Some(r) => Err(Error::usage(format!("{command} writes to the primary repository, not to replica {r}"))
            .with_hint("replicas are filled by `veza-dr replicate <policy>`")),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_command_line_definition_is_consistent() {
        // clap checks names, conflicts and requirements here rather than at a user's first call.
        <super::Cli as clap::CommandFactory>::command().debug_assert();
    }
}
