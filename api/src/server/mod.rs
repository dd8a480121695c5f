//! `cowvm serve`: the HTTP API (axum on tokio) over the clone engine. Blocking KVM work runs on
//! tokio's blocking pool, never on the async workers.

mod app;
mod call;
mod cells;
mod error;
mod export;
mod handlers;
mod listen;
pub mod model;
mod ops;
mod reports;
mod routes;
mod service;
mod spec;
mod state_dir;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use cowvm_vmm::{CloneEngine, EngineConfig, Kvm};
use tokio::sync::oneshot;

pub use app::Limits;
pub use cells::{CellView, CellsConfig, IDLE_AFTER, IDLE_CELLS};
pub use error::{ErrorBody, ErrorDetail, ServiceError};
pub use routes::ApiDoc;
pub use spec::{document as openapi_document, SpecOptions};

use app::App;
use service::templates;

/// How to run the server.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Address to listen on.
    pub listen: SocketAddr,
    /// Where templates are saved and loaded from.
    pub state_dir: Option<PathBuf>,
    /// Bearer token every request must carry (required off loopback).
    pub token: Option<String>,
    /// Limits.
    pub limits: Limits,
    /// Directory that `kernel` names in `POST /v1/vms` are looked up in (none: built-in guest only).
    pub kernel_dir: Option<PathBuf>,
    /// Stop on SIGINT/SIGTERM as well as on [`RunningServer::stop`].
    pub handle_signals: bool,
    /// Longest a client may take to send a request's head; slower connections are closed.
    pub header_timeout: Duration,
    /// Run clones of templates in sandboxed cell processes (`--cells`); none: in this process.
    pub cells: Option<CellsConfig>,
}

/// Default of [`ServerConfig::header_timeout`].
pub const DEFAULT_HEADER_TIMEOUT: Duration = Duration::from_secs(20);

impl ServerConfig {
    /// Loopback on `port` (0: any free port), no state directory, default limits.
    pub fn local(port: u16) -> Self {
        ServerConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], port)),
            state_dir: None,
            token: None,
            limits: Limits::default(),
            kernel_dir: None,
            handle_signals: false,
            header_timeout: DEFAULT_HEADER_TIMEOUT,
            cells: None,
        }
    }
}

/// Why the server could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// Listening off loopback without a token was asked for.
    #[error("refusing to listen on {0} without a bearer token: give --token-file, or listen on a loopback address")]
    NeedsToken(SocketAddr),
    /// KVM could not be opened.
    #[error(transparent)]
    Kvm(#[from] cowvm_vmm::KvmError),
    /// The clone engine could not start.
    #[error(transparent)]
    Engine(#[from] cowvm_vmm::CloneError),
    /// An I/O step failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The error.
        source: std::io::Error,
    },
    /// The cells could not be set up.
    #[error("cells: {0}")]
    Cells(#[from] cowvm_cell::PoolError),
    /// The state directory could not be read.
    #[error(transparent)]
    Persist(#[from] cowvm_vmm::persist::PersistError),
}

/// A server running on its own thread.
pub struct RunningServer {
    /// The address it listens on.
    pub addr: SocketAddr,
    shutdown: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<Result<(), ServeError>>>,
    /// Templates in the state directory that were refused at start, with the reason.
    pub refused_templates: Vec<String>,
    app: std::sync::Weak<App>,
}

impl RunningServer {
    /// Returns once every VM teardown requested so far has finished (DELETE answers before its VM
    /// is torn down in the background); for measurements that must see a quiescent server.
    pub fn wait_for_teardowns(&self) {
        if let Some(app) = self.app.upgrade() {
            app.engine.flush();
        }
    }

    /// Stops the server gracefully (every VM is torn down) and waits for it.
    pub fn stop(mut self) -> Result<(), ServeError> {
        self.stop_inner()
    }

    /// Waits until the server stops by itself (a signal).
    pub fn wait(mut self) -> Result<(), ServeError> {
        match self.thread.take() {
            Some(thread) => thread.join().unwrap_or(Ok(())),
            None => Ok(()),
        }
    }

    fn stop_inner(&mut self) -> Result<(), ServeError> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        match self.thread.take() {
            Some(thread) => thread.join().unwrap_or(Ok(())),
            None => Ok(()),
        }
    }
}

impl Drop for RunningServer {
    fn drop(&mut self) {
        let _ = self.stop_inner();
    }
}

async fn stop_signal(rx: oneshot::Receiver<()>, handle_signals: bool) {
    if !handle_signals {
        let _ = rx.await;
        return;
    }
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(term) => term,
        Err(_) => {
            let _ = rx.await;
            return;
        }
    };
    tokio::select! {
        _ = rx => {}
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

/// Starts the server on a thread of its own and returns once it listens.
pub fn start(config: ServerConfig) -> Result<RunningServer, ServeError> {
    if !config.listen.ip().is_loopback() && config.token.is_none() {
        return Err(ServeError::NeedsToken(config.listen));
    }
    let io = |what: &str| {
        let what = what.to_owned();
        move |source| ServeError::Io { what, source }
    };
    // The state directory is read before the engine starts, so a directory that cannot be used
    // stops the server before it builds anything.
    let startup = config.state_dir.as_deref().map(state_dir::open).transpose()?;
    let _ = cowvm_vmm::host::raise_fd_limit();
    let kvm = Arc::new(Kvm::open()?);
    // Probe the saveable MSRs now (a throw-away VM) rather than during the first snapshot.
    kvm.saveable_msrs()?;
    let engine_config = EngineConfig {
        first_run_deadline: config.limits.guest_deadline,
        max_clones_per_call: config.limits.max_clones_per_call,
        ..EngineConfig::default()
    };
    let engine = CloneEngine::new(kvm, engine_config)?;
    let app = Arc::new(App::new(
        engine,
        config.limits.clone(),
        config.state_dir.clone(),
        config.kernel_dir.clone(),
    ));
    if let Some(cells) = &config.cells {
        app.cells.enable(cells, Arc::downgrade(&app))?;
    }
    let refused = startup.as_ref().map(|s| s.refused.clone()).unwrap_or_default();
    if let Some(startup) = startup {
        state_dir::adopt(&app, startup);
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(io("start the async runtime"))?;
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind(config.listen))
        .map_err(io(&format!("listen on {}", config.listen)))?;
    let addr = listener.local_addr().map_err(io("read the listening address"))?;
    let router = routes::router(Arc::clone(&app), config.token.clone());
    let (tx, rx) = oneshot::channel();
    let weak_app = Arc::downgrade(&app);
    let handle_signals = config.handle_signals;
    let header_timeout = config.header_timeout;
    let thread = std::thread::Builder::new()
        .name("cowvm-server".into())
        .spawn(move || {
            runtime.block_on(listen::serve(
                listener,
                router,
                header_timeout,
                stop_signal(rx, handle_signals),
            ));
            app.shut_down();
            drop(runtime);
            Ok(())
        })
        .map_err(io("start the server thread"))?;
    Ok(RunningServer {
        addr,
        shutdown: Some(tx),
        thread: Some(thread),
        refused_templates: refused,
        app: weak_app,
    })
}
