//! The plugin host: wasmtime with the component model, bindings generated from `wit/`.
//!
//! A plugin is a component implementing `veza:dr/runbook-step@0.1.0`. Each call gets a fresh
//! store with a memory limit and an epoch deadline; the component imports nothing but the
//! `host` interface, so it has no filesystem, environment or sockets. Every capability it asks
//! for (HTTP to a host, SQL on a named connection, a secret substituted into a request) is
//! checked against the step's grants. A trap, a timeout or an exhausted memory limit becomes
//! an error value for the caller: it never unwinds into the daemon.
//!
//! Compiled components are cached on disk (`<state>/plugins/<wasm-hash>-<engine-hash>.cwasm`),
//! so a warm load deserializes instead of recompiling.

use super::spec::GrantSpec;
use crate::error::{Error, Kind, Result};
use crate::secret::SecretRef;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};
use wasmtime::component::{Component, HasSelf, Linker};
use wasmtime::{Engine, Store};

wasmtime::component::bindgen!({ world: "runbook-step", path: "../wit" });

pub use veza::dr::host::{HttpRequest, HttpResponse, Level};
pub use veza::dr::types::{Context, Description, Grants, Outcome, StepError};

/// The interface version this host implements.
pub const WIT_PACKAGE: &str = "veza:dr@0.1.0";

/// Epoch tick: the resolution of step deadlines.
const TICK: Duration = Duration::from_millis(5);

/// The one engine of the process, with a thread that advances its epoch.
fn engine() -> Result<&'static Engine> {
    static ENGINE: OnceLock<std::result::Result<Engine, String>> = OnceLock::new();
    ENGINE
        .get_or_init(|| {
            let mut cfg = wasmtime::Config::new();
            cfg.epoch_interruption(true);
            cfg.max_wasm_stack(1 << 20);
            let engine = Engine::new(&cfg).map_err(|e| format!("{e}"))?;
            let ticker = engine.clone();
            std::thread::Builder::new()
                .name("wasm-epoch".into())
                .spawn(move || loop {
                    std::thread::sleep(TICK);
                    ticker.increment_epoch();
                })
                .map_err(|e| e.to_string())?;
            Ok(engine)
        })
        .as_ref()
        .map_err(|e| Error::new(Kind::Failed, format!("cannot start the WebAssembly engine: {e}")))
}

/// A loaded (compiled or deserialized) plugin.
#[derive(Clone)]
pub struct Plugin {
    /// As the step names it.
    pub name: String,
    pub path: PathBuf,
    /// BLAKE3 of the `.wasm` file.
    pub hash: String,
    /// Whether the compiled form came from the cache.
    pub cached: bool,
    pub load_time: Duration,
    component: Component,
}

/// Loads plugins and runs their calls.
pub struct Host {
    plugins_dir: PathBuf,
    cache_dir: Option<PathBuf>,
    linker: Linker<StepState>,
}

impl Host {
    /// `plugins_dir` holds `<name>.wasm`; compiled components are cached in `cache_dir`.
    pub fn new(plugins_dir: &Path, cache_dir: Option<&Path>) -> Result<Host> {
        let engine = engine()?;
        let mut linker = Linker::new(engine);
        RunbookStep::add_to_linker::<_, HasSelf<_>>(&mut linker, |s| s)
            .map_err(|e| Error::new(Kind::Failed, format!("cannot link the plugin host: {e}")))?;
        Ok(Host { plugins_dir: plugins_dir.to_path_buf(), cache_dir: cache_dir.map(Path::to_path_buf), linker })
    }

    /// Where a step's `plugin` points: a name in the plugins directory, or a path.
    pub fn resolve(&self, plugin: &str) -> PathBuf {
        if plugin.contains('/') || plugin.ends_with(".wasm") {
            PathBuf::from(plugin)
        } else {
            self.plugins_dir.join(format!("{plugin}.wasm"))
        }
    }

    /// Load a plugin: from the compiled cache when it holds this exact file for this engine,
    /// else compile (and fill the cache).
    pub fn load(&self, plugin: &str) -> Result<Plugin> {
        let start = Instant::now();
        let path = self.resolve(plugin);
        let bytes = std::fs::read(&path).map_err(|e| {
            Error::io("read plugin", &path, e).with_hint(format!(
                "build the plugins with plugins/build.sh, or pass --plugins DIR (looked in {})",
                self.plugins_dir.display()
            ))
        })?;
        let bad = |msg: String| Error::usage(format!("plugin `{plugin}` ({}) {msg}", path.display()));
        match bytes.get(..8) {
            // The preamble: magic, a 16-bit version, then the layer (0 module, 1 component).
            Some([0, b'a', b's', b'm', _, _, 1, 0]) => {}
            Some([0, b'a', b's', b'm', _, _, 0, 0]) => {
                return Err(bad("is a core WebAssembly module, not a component".into())
                    .with_hint("link it with wasm-component-ld or wrap it with `wasm-tools component new`"))
            }
            _ => return Err(bad("is not a WebAssembly component".into())),
        }
        let hash = blake3::hash(&bytes).to_hex().to_string();
        let engine = engine()?;
        let cache_file =
            self.cache_dir.as_ref().map(|d| d.join(format!("{}-{}.cwasm", &hash[..32], engine_hash(engine))));
        if let Some(component) = cache_file.as_deref().and_then(|f| read_cached(engine, f)) {
            return Ok(Plugin { name: plugin.into(), path, hash, cached: true, load_time: start.elapsed(), component });
        }
        let component =
            Component::new(engine, &bytes).map_err(|e| bad(format!("is not a valid component: {}", first_line(&e))))?;
        check_world(engine, &component)
            .map_err(|m| bad(m).with_hint("rebuild the plugin against wit/ of this veza-dr"))?;
        if let Some(f) = &cache_file {
            if let Err(e) = write_cached(&component, f) {
                tracing::warn!(plugin, error = %e.message, "cannot cache the compiled plugin; the next load compiles again");
            }
        }
        Ok(Plugin { name: plugin.into(), path, hash, cached: false, load_time: start.elapsed(), component })
    }

    /// Instantiate a plugin for one call with these limits and capabilities.
    pub fn instantiate(&self, plugin: &Plugin, state: StepState) -> Result<Instance, CallError> {
        let mut store = Store::new(engine().map_err(|e| CallError::Host(e.message))?, state);
        store.limiter(|s| &mut s.limiter);
        let ticks = store.data().deadline.saturating_duration_since(Instant::now()).as_millis() as u64
            / TICK.as_millis() as u64
            + 1;
        store.set_epoch_deadline(ticks);
        let bindings = RunbookStep::instantiate(&mut store, &plugin.component, &self.linker).map_err(|e| {
            let msg = first_line(&e);
            if msg.contains("matching implementation was not found") || msg.contains("no exported instance") {
                CallError::Interface(format!(
                    "was built for another interface: {msg} (this host implements {WIT_PACKAGE})"
                ))
            } else {
                classify(&e, store.data())
            }
        })?;
        Ok(Instance { store, bindings })
    }
}

/// The component must import nothing but `veza:dr/*` of this version and export the step.
fn check_world(engine: &Engine, component: &Component) -> std::result::Result<(), String> {
    let version = WIT_PACKAGE.rsplit('@').next().unwrap_or("");
    let ty = component.component_type();
    for (name, _) in ty.imports(engine) {
        if name.starts_with("veza:dr/") && !name.ends_with(&format!("@{version}")) {
            return Err(format!(
                "was built for another interface: it imports `{name}` (this host implements {WIT_PACKAGE})"
            ));
        }
        if !name.starts_with("veza:dr/") {
            return Err(format!(
                "imports `{name}`, which this host does not provide: plugins get no filesystem, environment, clock or sockets of their own, only veza:dr/host"
            ));
        }
    }
    let step = format!("veza:dr/step@{version}");
    let exports: Vec<String> = ty.exports(engine).map(|(n, _)| n.to_string()).collect();
    if !exports.contains(&step) {
        return Err(format!(
            "was built for another interface: it does not export `{step}` (it exports: {})",
            if exports.is_empty() { "nothing".to_string() } else { exports.join(", ") }
        ));
    }
    Ok(())
}

/// Why a call did not return a value.
#[derive(Debug, Clone)]
pub enum CallError {
    /// The plugin returned an error value.
    Step(StepError),
    /// The deadline passed (the plugin was interrupted).
    Timeout,
    /// The plugin tried to grow its memory past the limit (bytes).
    OutOfMemory(u64),
    /// The plugin trapped.
    Trap(String),
    /// The component does not implement this host's world version.
    Interface(String),
    /// The host itself failed.
    Host(String),
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CallError::Step(StepError::InvalidConfig(m)) => write!(f, "invalid config: {m}"),
            CallError::Step(StepError::Failed(m)) => write!(f, "failed: {m}"),
            CallError::Step(StepError::Retryable(m)) => write!(f, "failed (retryable): {m}"),
            CallError::Timeout => write!(f, "timed out: the plugin was stopped at its deadline"),
            CallError::OutOfMemory(n) => {
                write!(f, "ran out of memory: it tried to grow past its limit of {} MiB", n >> 20)
            }
            CallError::Trap(m) => write!(f, "trapped: {m}"),
            CallError::Interface(m) | CallError::Host(m) => write!(f, "{m}"),
        }
    }
}

impl CallError {
    /// Whether another attempt may succeed.
    pub fn retryable(&self) -> bool {
        matches!(self, CallError::Step(StepError::Retryable(_)) | CallError::Timeout)
    }
}

fn first_line(e: &wasmtime::Error) -> String {
    format!("{e:#}").lines().next().unwrap_or("").to_string()
}

fn classify(e: &wasmtime::Error, state: &StepState) -> CallError {
    if state.limiter.exceeded {
        return CallError::OutOfMemory(state.limiter.limit as u64);
    }
    match e.downcast_ref::<wasmtime::Trap>() {
        Some(wasmtime::Trap::Interrupt) => CallError::Timeout,
        Some(t) => CallError::Trap(t.to_string().trim_start_matches("wasm trap: ").to_string()),
        None => CallError::Trap(first_line(e)),
    }
}

/// One instantiated plugin, good for one call (a fresh one per call keeps calls independent).
pub struct Instance {
    store: Store<StepState>,
    bindings: RunbookStep,
}

macro_rules! call {
    ($self:ident, $f:ident $(, $arg:expr)*) => {{
        let step = $self.bindings.veza_dr_step();
        match step.$f(&mut $self.store $(, $arg)*) {
            Ok(v) => Ok(v),
            Err(e) => Err(classify(&e, $self.store.data())),
        }
    }};
}

impl Instance {
    pub fn describe(&mut self) -> Result<Description, CallError> {
        call!(self, call_describe)
    }
    pub fn needs_for(&mut self, config: &[(String, String)]) -> Result<Grants, CallError> {
        call!(self, call_needs_for, &config.to_vec())?.map_err(CallError::Step)
    }
    pub fn validate(&mut self, config: &[(String, String)]) -> Result<(), CallError> {
        call!(self, call_validate, &config.to_vec())?.map_err(CallError::Step)
    }
    pub fn plan(&mut self, ctx: &Context) -> Result<Vec<String>, CallError> {
        call!(self, call_plan, ctx)?.map_err(CallError::Step)
    }
    pub fn run(&mut self, ctx: &Context) -> Result<Outcome, CallError> {
        call!(self, call_run, ctx)?.map_err(CallError::Step)
    }
    pub fn verify(&mut self, ctx: &Context) -> Result<Outcome, CallError> {
        call!(self, call_verify, ctx)?.map_err(CallError::Step)
    }
    /// The log lines the plugin wrote during the call.
    pub fn logs(&self) -> &[(Level, String)] {
        &self.store.data().logs
    }
}

/// A memory limit that remembers it was hit, so the trap can be named.
/// A plugin's resources: the memory limit covers all its memories together, and the number of
/// instances, memories and tables a call may create is bounded too (a component could
/// otherwise multiply memories each within the per-memory limit).
pub struct Limiter {
    limit: usize,
    /// Bytes of every linear memory of the store together.
    used: usize,
    exceeded: bool,
}

/// What one call may create: a component of ours is one core module plus a few shims.
const MAX_INSTANCES: usize = 16;
const MAX_MEMORIES: usize = 4;
const MAX_TABLES: usize = 16;
const MAX_TABLE_ELEMENTS: usize = 100_000;

impl wasmtime::ResourceLimiter for Limiter {
    fn memory_growing(&mut self, current: usize, desired: usize, _max: Option<usize>) -> wasmtime::Result<bool> {
        let total = self.used.saturating_sub(current).saturating_add(desired);
        if total > self.limit {
            self.exceeded = true;
            return Err(wasmtime::Error::msg(format!("memory limit of {} bytes exceeded", self.limit)));
        }
        self.used = total;
        Ok(true)
    }
    fn table_growing(&mut self, _current: usize, desired: usize, _max: Option<usize>) -> wasmtime::Result<bool> {
        Ok(desired <= MAX_TABLE_ELEMENTS)
    }
    fn instances(&self) -> usize {
        MAX_INSTANCES
    }
    fn memories(&self) -> usize {
        MAX_MEMORIES
    }
    fn tables(&self) -> usize {
        MAX_TABLES
    }
}

/// The most a host call hands a plugin: an HTTP response body, the text of SQL rows.
pub const MAX_BODY: usize = 4 << 20;
pub const MAX_ROWS: usize = 10_000;

/// What a call may do, and what it did.
pub struct StepState {
    runbook: String,
    step: String,
    grants: GrantSpec,
    connections: BTreeMap<String, crate::source::postgres::Dsn>,
    secrets: BTreeMap<String, SecretRef>,
    deadline: Instant,
    plan_mode: bool,
    rt: tokio::runtime::Handle,
    limiter: Limiter,
    http: Option<reqwest::Client>,
    pg: HashMap<String, tokio_postgres::Client>,
    logs: Vec<(Level, String)>,
}

impl StepState {
    /// `connections` and `secrets` are the runbook's declarations; only the names in `grants`
    /// can be used.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        runbook: &str,
        step: &str,
        grants: GrantSpec,
        connections: BTreeMap<String, crate::source::postgres::Dsn>,
        secrets: BTreeMap<String, SecretRef>,
        timeout: Duration,
        memory_limit: u64,
        plan_mode: bool,
        rt: tokio::runtime::Handle,
    ) -> StepState {
        StepState {
            runbook: runbook.into(),
            step: step.into(),
            grants,
            connections,
            secrets,
            deadline: Instant::now() + timeout,
            plan_mode,
            rt,
            limiter: Limiter { limit: usize::try_from(memory_limit).unwrap_or(usize::MAX), used: 0, exceeded: false },
            http: None,
            pg: HashMap::new(),
            logs: Vec::new(),
        }
    }

    fn remaining(&self) -> Duration {
        self.deadline.saturating_duration_since(Instant::now())
    }

    fn failed(&self, msg: String) -> StepError {
        StepError::Failed(msg)
    }

    /// Replace `${secret:NAME}` by the value of a granted secret; returns the names used.
    fn substitute(&self, text: &str, used: &mut Vec<(String, String)>) -> Result<String, StepError> {
        let mut out = String::with_capacity(text.len());
        let mut rest = text;
        while let Some(i) = rest.find("${secret:") {
            out.push_str(&rest[..i]);
            let after = &rest[i + "${secret:".len()..];
            let end = after.find('}').ok_or_else(|| self.failed("unterminated `${secret:` reference".into()))?;
            let name = &after[..end];
            if !self.grants.secrets.iter().any(|s| s == name) {
                return Err(self.failed(format!("secret `{name}` is not granted to step `{}`", self.step)));
            }
            let r = self.secrets.get(name).ok_or_else(|| self.failed(format!("secret `{name}` is not declared")))?;
            let value = r.resolve().map_err(|e| self.failed(format!("secret `{name}`: {}", e.message)))?;
            out.push_str(&value);
            used.push((name.to_string(), value));
            rest = &after[end + 1..];
        }
        out.push_str(rest);
        Ok(out)
    }

    /// Whether `url`'s host (and port) is granted. A grant without a port allows any port.
    fn http_granted(&self, url: &url::Url) -> Option<String> {
        let host = url.host_str()?.to_string();
        let port = url.port_or_known_default()?;
        let with_port = format!("{host}:{port}");
        let ok = self.grants.http.iter().any(|g| *g == host || *g == with_port);
        (!ok).then_some(with_port)
    }

    /// Resolve a granted host name and refuse addresses that need a literal grant: loopback,
    /// link-local (the cloud metadata service, 169.254.169.254), unspecified. Returns the name
    /// and the checked address to connect to; `None` for a literal address (granted as such).
    fn resolve_checked(
        &self,
        url: &url::Url,
        secret: Option<&str>,
    ) -> Result<Option<(String, std::net::SocketAddr)>, StepError> {
        let Some(url::Host::Domain(name)) = url.host() else { return Ok(None) };
        let port = url.port_or_known_default().unwrap_or(80);
        let name = name.to_string();
        let addrs: Vec<std::net::SocketAddr> = self
            .rt
            .block_on(tokio::net::lookup_host((name.as_str(), port)))
            .map_err(|e| match secret {
                Some(shown) => StepError::Retryable(format!("cannot resolve the host in {shown}")),
                None => StepError::Retryable(format!("cannot resolve `{name}`: {e}")),
            })?
            .collect();
        let special = |ip: &std::net::IpAddr| match ip {
            std::net::IpAddr::V4(v4) => v4.is_loopback() || v4.is_link_local() || v4.is_unspecified(),
            std::net::IpAddr::V6(v6) => {
                v6.is_loopback()
                    || v6.is_unspecified()
                    || (v6.segments()[0] & 0xffc0) == 0xfe80
                    || v6.to_ipv4_mapped().is_some_and(|m| m.is_loopback() || m.is_link_local())
            }
        };
        if let Some(a) = addrs.iter().find(|a| special(&a.ip())) {
            let (what, to) = match secret {
                Some(shown) => (format!("the host in {shown}"), "an address".to_string()),
                None => (format!("`{name}`"), a.ip().to_string()),
            };
            return Err(self.failed(format!(
                "{what} resolves to {to}, a loopback, link-local or metadata address: grant that address itself to reach it"
            )));
        }
        let first =
            addrs.first().copied().ok_or_else(|| StepError::Retryable("a granted host has no address".into()))?;
        Ok(Some((name, first)))
    }

    fn client(&mut self) -> Result<reqwest::Client, StepError> {
        if let Some(c) = &self.http {
            return Ok(c.clone());
        }
        let c = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .user_agent(concat!("veza-dr/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| self.failed(format!("cannot build an HTTP client: {e}")))?;
        self.http = Some(c.clone());
        Ok(c)
    }
}

/// Replace every occurrence of a substituted secret in a response by `[secret:NAME]`, so a
/// server that echoes a header cannot hand the value to the plugin.
fn scrub(mut bytes: Vec<u8>, used: &[(String, String)]) -> Vec<u8> {
    for (name, value) in used {
        let v = value.as_bytes();
        if v.len() < 4 {
            continue;
        }
        let mark = format!("[secret:{name}]").into_bytes();
        let mut out = Vec::with_capacity(bytes.len());
        let mut i = 0;
        while i < bytes.len() {
            if bytes[i..].starts_with(v) {
                out.extend_from_slice(&mark);
                i += v.len();
            } else {
                out.push(bytes[i]);
                i += 1;
            }
        }
        bytes = out;
    }
    bytes
}

impl veza::dr::types::Host for StepState {}

impl veza::dr::host::Host for StepState {
    fn log(&mut self, level: Level, message: String) {
        let mut message = message;
        message.truncate(message.char_indices().nth(4096).map(|(i, _)| i).unwrap_or(message.len()));
        let (rb, st) = (&self.runbook, &self.step);
        match level {
            Level::Debug => tracing::debug!(runbook = %rb, step = %st, "{message}"),
            Level::Info => tracing::info!(runbook = %rb, step = %st, "{message}"),
            Level::Warn => tracing::warn!(runbook = %rb, step = %st, "{message}"),
            Level::Error => tracing::error!(runbook = %rb, step = %st, "{message}"),
        }
        if self.logs.len() < 1000 {
            self.logs.push((level, message));
        }
    }

    fn now_ms(&mut self) -> u64 {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
    }

    fn sleep_ms(&mut self, ms: u64) {
        std::thread::sleep(Duration::from_millis(ms).min(self.remaining()));
    }

    fn http(&mut self, req: HttpRequest) -> Result<HttpResponse, StepError> {
        let method = req.method.to_ascii_uppercase();
        if self.plan_mode && !matches!(method.as_str(), "GET" | "HEAD") {
            return Err(self.failed(format!("a dry run may only read: {method} is not allowed during plan")));
        }
        // A secret may go in the path or the query, never where the host is decided: a refusal
        // naming the host would hand the value back to the plugin.
        // (A URL that is a secret as a whole, as a webhook URL is, may go: then messages say
        // "the host in `${secret:hook}`" and never name it.)
        let literal = req.url.split_once("://").filter(|(scheme, _)| !scheme.contains("${"));
        let authority = literal.map(|(_, r)| r.split(['/', '?', '#']).next().unwrap_or("")).unwrap_or("");
        if authority.contains("${secret:") {
            return Err(self.failed("secrets are not allowed in a URL's host, port or user info".into()));
        }
        let host_from_secret = literal.is_none() && req.url.contains("${secret:");
        let mut used = Vec::new();
        let url_text = self.substitute(&req.url, &mut used)?;
        // Messages show the URL as the plugin wrote it (with `${secret:…}`), never substituted.
        let shown = req.url.clone();
        let url = url::Url::parse(&url_text).map_err(|_| self.failed(format!("{shown} is not a valid URL")))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(self.failed(format!("{shown}: only http and https are allowed")));
        }
        if let Some(hp) = self.http_granted(&url) {
            let hp = if host_from_secret { format!("the host in {shown}") } else { format!("`{hp}`") };
            return Err(self.failed(format!(
                "HTTP to {hp} is not granted to step `{}` (granted: {})",
                self.step,
                grants_text(&self.grants.http)
            )));
        }
        let pinned = self.resolve_checked(&url, host_from_secret.then_some(shown.as_str()))?;
        let m = reqwest::Method::from_bytes(method.as_bytes())
            .map_err(|_| self.failed(format!("`{method}` is not an HTTP method")))?;
        let remaining = self.remaining();
        if remaining.is_zero() {
            return Err(self.failed("the step's deadline has passed".into()));
        }
        let timeout = Duration::from_millis(req.timeout_ms.unwrap_or(30_000)).min(remaining);
        let client = match pinned {
            // A name is connected to the address that was checked (no second lookup to rebind).
            Some((host, addr)) => reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .no_proxy()
                .user_agent(concat!("veza-dr/", env!("CARGO_PKG_VERSION")))
                .resolve(&host, addr)
                .build()
                .map_err(|e| self.failed(format!("cannot build an HTTP client: {e}")))?,
            None => self.client()?,
        };
        let mut builder = client.request(m, url).timeout(timeout).body(req.body);
        for (k, v) in &req.headers {
            let v = self.substitute(v, &mut used)?;
            builder = builder.header(k, v);
        }
        let fut = async move {
            let resp = builder.send().await?;
            let status = resp.status().as_u16();
            let headers: Vec<(String, String)> = resp
                .headers()
                .iter()
                .map(|(k, v)| (k.to_string(), String::from_utf8_lossy(v.as_bytes()).into_owned()))
                .collect();
            // Read at most MAX_BODY: a plugin's answer is held in host memory first.
            let mut resp = resp;
            let mut body = Vec::new();
            while let Some(chunk) = resp.chunk().await? {
                if body.len() + chunk.len() > MAX_BODY {
                    return Ok((status, headers, None));
                }
                body.extend_from_slice(&chunk);
            }
            Ok::<_, reqwest::Error>((status, headers, Some(body)))
        };
        match self.rt.block_on(fut) {
            Ok((_, _, None)) => {
                Err(self.failed(format!("the response to {method} {shown} is larger than {MAX_BODY} bytes")))
            }
            Ok((status, headers, Some(body))) => {
                let body = scrub(body, &used);
                let headers = headers
                    .into_iter()
                    .map(|(k, v)| (k, String::from_utf8_lossy(&scrub(v.into_bytes(), &used)).into_owned()))
                    .collect();
                Ok(HttpResponse { status, headers, body })
            }
            Err(e) => {
                let what = if e.is_timeout() { "timed out".to_string() } else { error_chain(&e) };
                let what = scrub(what.into_bytes(), &used);
                Err(StepError::Retryable(format!("{method} {shown}: {}", String::from_utf8_lossy(&what))))
            }
        }
    }

    fn sql(&mut self, connection: String, statement: String) -> Result<Vec<Vec<Option<String>>>, StepError> {
        if !self.grants.connections.contains(&connection) {
            return Err(self.failed(format!(
                "connection `{connection}` is not granted to step `{}` (granted: {})",
                self.step,
                grants_text(&self.grants.connections)
            )));
        }
        if self.plan_mode {
            if let Err(why) = super::readonly::check(&statement) {
                return Err(self.failed(format!("a dry run may only read: {why}")));
            }
        }
        let remaining = self.remaining();
        if !self.pg.contains_key(&connection) {
            let r = self
                .connections
                .get(&connection)
                .cloned()
                .ok_or_else(|| self.failed(format!("connection `{connection}` is not declared")))?;
            let plan = self.plan_mode;
            let client = self
                .rt
                .block_on(async move {
                    let c = tokio::time::timeout(remaining, crate::source::postgres::connect_dsn(&r))
                        .await
                        .map_err(|_| Error::new(Kind::Database, format!("connecting with {r} timed out")))??;
                    if plan {
                        c.batch_execute("SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY")
                            .await
                            .map_err(|e| crate::source::postgres::db_error(&r.to_string(), "set read-only", e))?;
                    }
                    Ok::<_, Error>(c)
                })
                .map_err(|e| StepError::Retryable(format!("connection `{connection}`: {}", e.message)))?;
            self.pg.insert(connection.clone(), client);
        }
        let client = &self.pg[&connection];
        let out = self.rt.block_on(tokio::time::timeout(remaining, client.simple_query(&statement)));
        let msgs = match out {
            Err(_) => {
                return Err(self.failed(format!("SQL on `{connection}` did not finish before the step's deadline")))
            }
            Ok(Err(e)) => {
                let msg = e.as_db_error().map(|d| d.message().to_string()).unwrap_or_else(|| e.to_string());
                return Err(if e.as_db_error().is_some() {
                    self.failed(format!("SQL on `{connection}`: {msg}"))
                } else {
                    self.pg.remove(&connection);
                    StepError::Retryable(format!("SQL on `{connection}`: {msg}"))
                });
            }
            Ok(Ok(m)) => m,
        };
        let mut groups: Vec<Vec<Vec<Option<String>>>> = vec![Vec::new()];
        let mut text = 0usize;
        for m in msgs {
            match m {
                tokio_postgres::SimpleQueryMessage::Row(row) => {
                    let vals: Vec<Option<String>> = (0..row.len()).map(|i| row.get(i).map(str::to_string)).collect();
                    text += vals.iter().flatten().map(String::len).sum::<usize>();
                    let g = groups.last_mut().expect("one group");
                    if g.len() >= MAX_ROWS || text > MAX_BODY {
                        return Err(self.failed(format!(
                            "SQL on `{connection}` returned more than {MAX_ROWS} rows or {MAX_BODY} bytes of text"
                        )));
                    }
                    g.push(vals);
                }
                tokio_postgres::SimpleQueryMessage::CommandComplete(_) => groups.push(Vec::new()),
                _ => {}
            }
        }
        groups.pop();
        Ok(groups.pop().unwrap_or_default())
    }
}

fn grants_text(v: &[String]) -> String {
    if v.is_empty() {
        "none".into()
    } else {
        v.join(", ")
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(x) = src {
        let t = x.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        src = x.source();
    }
    s
}

fn engine_hash(engine: &Engine) -> String {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    engine.precompile_compatibility_hash().hash(&mut h);
    format!("{:016x}", h.finish())
}

/// A cached compiled component, if the file is intact. The file carries a BLAKE3 of its
/// contents after the artifact, written by `write_cached`; a torn or altered file is ignored.
fn read_cached(engine: &Engine, file: &Path) -> Option<Component> {
    let bytes = std::fs::read(file).ok()?;
    if bytes.len() < 32 {
        return None;
    }
    let (artifact, sum) = bytes.split_at(bytes.len() - 32);
    if blake3::hash(artifact).as_bytes() != sum {
        tracing::warn!(file = %file.display(), "the compiled-plugin cache file is damaged; compiling again");
        return None;
    }
    // SAFETY: `Component::deserialize` trusts its input to be an artifact produced by
    // `Component::serialize` for a compatible engine. This file is written only by
    // `write_cached` into the private state directory, named after the engine's compatibility
    // hash, and its BLAKE3 trailer was just checked, so it is exactly the bytes we wrote.
    // Measured: deserializing costs 0.2-1.5 ms, compiling 10-80 ms per plugin (FIELD-NOTES).
    match unsafe { Component::deserialize(engine, artifact) } {
        Ok(c) => Some(c),
        Err(e) => {
            tracing::warn!(file = %file.display(), error = %first_line(&e), "cannot use the compiled-plugin cache; compiling again");
            None
        }
    }
}

fn write_cached(component: &Component, file: &Path) -> Result<()> {
    let mut bytes = component.serialize().map_err(|e| Error::new(Kind::Failed, format!("cannot serialize: {e}")))?;
    let sum = *blake3::hash(&bytes).as_bytes();
    bytes.extend_from_slice(&sum);
    let dir = file.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| Error::io("create plugin cache", dir, e))?;
    let tmp = tempfile::NamedTempFile::new_in(dir).map_err(|e| Error::io("create plugin cache file", dir, e))?;
    std::fs::write(tmp.path(), &bytes).map_err(|e| Error::io("write plugin cache", tmp.path(), e))?;
    tmp.persist(file).map_err(|e| Error::io("write plugin cache", file, e.error))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scrub_replaces_secret_values() {
        let used = vec![("k".to_string(), "hunter22".to_string())];
        assert_eq!(
            scrub(b"key=hunter22; again hunter22".to_vec(), &used),
            b"key=[secret:k]; again [secret:k]".to_vec()
        );
    }
}
