//! The drill's scratch space: a private directory (0700; handed to the throw-away server's
//! user when a server is adopted) and the server running in it. Dropping it, also when the
//! time limit cancels the drill mid-phase, stops the server and removes the directory.

use super::report::Report;
use crate::error::{Error, Result};
use crate::source::postgres::server::Server;
use crate::source::DrillEnv;
use std::path::Path;

pub struct Sandbox {
    dir: tempfile::TempDir,
    server: Option<Server>,
    /// The phase in progress, named when the time limit stops the drill.
    pub phase: Phase,
}

/// The phase a drill is in, shared with whoever shows progress (the CLI's spinner).
#[derive(Clone, Debug)]
pub struct Phase(std::sync::Arc<std::sync::Mutex<&'static str>>);

impl Default for Phase {
    fn default() -> Phase {
        Phase(std::sync::Arc::new(std::sync::Mutex::new("setup")))
    }
}

impl Phase {
    pub fn set(&self, p: &'static str) {
        *self.0.lock().expect("not poisoned") = p;
    }
    pub fn get(&self) -> &'static str {
        *self.0.lock().expect("not poisoned")
    }
}

impl Sandbox {
    pub fn new(phase: Phase) -> Result<Sandbox> {
        // tempfile creates the directory 0700: restored production data is never readable
        // by other users, not even for a moment.
        let dir = tempfile::Builder::new()
            .prefix("veza-drill-")
            .tempdir()
            .map_err(|e| Error::failed(format!("cannot create the drill sandbox: {e}")))?;
        phase.set("setup");
        Ok(Sandbox { dir, server: None, phase })
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn server(&self) -> Option<&Server> {
        self.server.as_ref()
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        if let Some(s) = self.server.take() {
            if s.data.join("postmaster.pid").exists() {
                s.stop();
            }
            let _ = std::fs::remove_dir_all(s.socket_dir());
        }
    }
}

/// What a source sees of the sandbox while it drills: the directory, the port, the report.
pub struct Env<'a> {
    pub sandbox: &'a mut Sandbox,
    pub report: &'a mut Report,
    pub port: Option<u16>,
}

impl DrillEnv for Env<'_> {
    fn dir(&self) -> &Path {
        self.sandbox.dir.path()
    }

    fn port(&self) -> Result<u16> {
        match self.port {
            Some(p) => Ok(p),
            None => std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .map(|a| a.port())
                .map_err(|e| Error::failed(format!("cannot find a free port for the drill server: {e}"))),
        }
    }

    fn begin(&mut self, phase: &'static str) {
        self.sandbox.phase.set(phase);
    }

    fn record(&mut self, phase: &str, seconds: f64, outcome: &Result<String>) -> bool {
        self.report.phase(phase, seconds, outcome)
    }

    fn adopt(&mut self, server: Server) {
        // The server's user must reach its data directory inside the private sandbox.
        let _ = std::os::unix::fs::chown(self.sandbox.dir.path(), Some(server.uid), None);
        self.sandbox.server = Some(server);
    }

    fn note_recovery(&mut self, wal_from: Option<String>, lsn: Option<String>, last_transaction: Option<String>) {
        self.report.wal_from = wal_from;
        self.report.recovered_lsn = lsn;
        self.report.last_transaction = last_transaction;
    }
}
