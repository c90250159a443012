//! The containerd front end: containerd's Snapshotter gRPC service on a
//! unix socket (proxy plugin `type = "snapshot"`).
//!
//! It only decodes gRPC and calls [`service::containerd::Snapshotter`];
//! tonic and tokio live in this folder alone. The server runs on its own
//! thread with its own tokio runtime; [`Server::stop`] ends it and joins
//! the thread. The socket is created owned by root with mode 0600 from the
//! moment it exists (never wider, whatever the umask): being able to
//! connect is the right to change containerd's snapshots.
//!
//! [`service::containerd::Snapshotter`]: crate::service::containerd::Snapshotter

mod filter;

use crate::engine::containerd::{LayerInfo, LayerMount};
use crate::error::{Error, IoContext, Result};
use crate::service::containerd::Snapshotter as Service;
use crate::types::ContainerdKind;
use containerd_snapshots::api::types::Mount;
use containerd_snapshots::{Info, Kind, Snapshotter, Usage};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tonic::Status;

/// The running gRPC server.
pub struct Server {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
    path: PathBuf,
    service: Arc<Service>,
}

impl Server {
    /// Serve `service` on the unix socket `path` (a stale socket there is
    /// replaced).
    pub fn start(path: &Path, service: Arc<Service>) -> Result<Server> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("containerd-grpc")
            .enable_all()
            .build()
            .ctx(|| "start the containerd gRPC runtime".into())?;
        // Mode 0600 from the moment it is there (bound in a 0700 directory,
        // then renamed over any stale socket): see `scm::bind_unix`.
        let listener = crate::sys::scm::bind_unix(path, 0o600)
            .and_then(|l| l.set_nonblocking(true).map(|_| l))
            .ctx(|| format!("bind {}", path.display()))?;
        let listener = {
            let _g = rt.enter();
            tokio::net::UnixListener::from_std(listener)
                .ctx(|| format!("serve {}", path.display()))?
        };
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let grpc = containerd_snapshots::server(Arc::new(Front {
            service: service.clone(),
        }));
        let shown = path.display().to_string();
        let thread = std::thread::Builder::new()
            .name("containerd".into())
            .spawn(move || {
                let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener);
                let r = rt.block_on(
                    tonic::transport::Server::builder()
                        .add_service(grpc)
                        .serve_with_incoming_shutdown(incoming, async {
                            let _ = rx.await;
                        }),
                );
                if let Err(e) = r {
                    log::error!("containerd snapshotter on {shown} failed: {e}");
                }
                rt.shutdown_timeout(Duration::from_secs(5));
            })
            .ctx(|| "start the containerd thread".into())?;
        log::info!("containerd snapshotter listening on {}", path.display());
        Ok(Server {
            stop: Some(tx),
            thread: Some(thread),
            path: path.to_path_buf(),
            service,
        })
    }

    /// Stop serving, join the thread, detach containerd's devices.
    pub fn stop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take()
            && t.join().is_err()
        {
            log::error!("the containerd thread panicked");
        }
        let _ = std::fs::remove_file(&self.path);
        self.service.detach_all();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The adapter from containerd-snapshots' trait to the service.
struct Front {
    service: Arc<Service>,
}

fn status(e: Error) -> Status {
    let m = e.to_string();
    match e {
        Error::NotFound(_) => Status::not_found(m),
        Error::AlreadyExists(_) => Status::already_exists(m),
        Error::NotEmpty(_) | Error::Busy(_) => Status::failed_precondition(m),
        Error::Invalid(_) | Error::InvalidName { .. } | Error::InvalidSize { .. } => {
            Status::invalid_argument(m)
        }
        Error::NoSpace(_) => Status::resource_exhausted(m),
        Error::PermissionDenied(_) => Status::permission_denied(m),
        _ => Status::internal(m),
    }
}

impl Front {
    /// Run `f` on the service off the async workers (tokio's blocking
    /// pool), map its error to a gRPC status, and log what it was, how
    /// long it took and how it ended. Every call goes through here.
    async fn call<T: Send + 'static>(
        &self,
        what: String,
        f: impl FnOnce(&Service) -> Result<T> + Send + 'static,
    ) -> std::result::Result<T, Status> {
        let s = self.service.clone();
        let t = std::time::Instant::now();
        let r = match tokio::task::spawn_blocking(move || f(&s)).await {
            Ok(r) => r.map_err(status),
            Err(e) => Err(Status::internal(format!("snapshotter task failed: {e}"))),
        };
        let ms = t.elapsed().as_secs_f64() * 1e3;
        match &r {
            Ok(_) => log::info!("containerd: {what} in {ms:.1} ms"),
            Err(e) if e.code() == tonic::Code::ResourceExhausted => {
                log::warn!("containerd: {what} failed in {ms:.1} ms: {}", e.message())
            }
            Err(e) => log::info!("containerd: {what} failed in {ms:.1} ms: {}", e.message()),
        }
        r
    }
}

fn mounts(m: LayerMount) -> Vec<Mount> {
    vec![Mount {
        r#type: m.fs,
        source: m.source.display().to_string(),
        target: String::new(),
        options: m.options,
    }]
}

fn labels(l: HashMap<String, String>) -> BTreeMap<String, String> {
    l.into_iter().collect()
}

fn to_info(l: LayerInfo) -> Info {
    let at = |secs: u64| SystemTime::UNIX_EPOCH + Duration::from_secs(secs);
    Info {
        kind: match l.kind {
            ContainerdKind::Active => Kind::Active,
            ContainerdKind::View => Kind::View,
            ContainerdKind::Committed => Kind::Committed,
        },
        name: l.key,
        parent: l.parent,
        labels: l.labels.into_iter().collect(),
        created_at: at(l.created),
        updated_at: at(l.updated),
    }
}

type InfoStream = tokio_stream::Iter<std::vec::IntoIter<std::result::Result<Info, Status>>>;

#[tonic::async_trait]
impl Snapshotter for Front {
    type Error = Status;

    async fn stat(&self, key: String) -> std::result::Result<Info, Status> {
        self.call(format!("stat {key}"), move |s| s.stat(&key))
            .await
            .map(to_info)
    }

    async fn update(
        &self,
        info: Info,
        fieldpaths: Option<Vec<String>>,
    ) -> std::result::Result<Info, Status> {
        self.call(format!("update {}", info.name), move |s| {
            s.update(&info.name, labels(info.labels), fieldpaths.as_deref())
        })
        .await
        .map(to_info)
    }

    async fn usage(&self, key: String) -> std::result::Result<Usage, Status> {
        let size = self
            .call(format!("usage {key}"), move |s| s.usage(&key))
            .await?;
        Ok(Usage {
            inodes: 0,
            size: i64::try_from(size).unwrap_or(i64::MAX),
        })
    }

    async fn mounts(&self, key: String) -> std::result::Result<Vec<Mount>, Status> {
        self.call(format!("mounts {key}"), move |s| s.mounts(&key))
            .await
            .map(mounts)
    }

    async fn prepare(
        &self,
        key: String,
        parent: String,
        l: HashMap<String, String>,
    ) -> std::result::Result<Vec<Mount>, Status> {
        self.call(format!("prepare {key} (parent {parent:?})"), move |s| {
            s.prepare(&key, &parent, labels(l))
        })
        .await
        .map(mounts)
    }

    async fn view(
        &self,
        key: String,
        parent: String,
        l: HashMap<String, String>,
    ) -> std::result::Result<Vec<Mount>, Status> {
        self.call(format!("view {key} (parent {parent:?})"), move |s| {
            s.view(&key, &parent, labels(l))
        })
        .await
        .map(mounts)
    }

    async fn commit(
        &self,
        name: String,
        key: String,
        l: HashMap<String, String>,
    ) -> std::result::Result<(), Status> {
        self.call(format!("commit {key} as {name}"), move |s| {
            s.commit(&name, &key, labels(l))
        })
        .await
    }

    async fn remove(&self, key: String) -> std::result::Result<(), Status> {
        self.call(format!("remove {key}"), move |s| s.remove(&key))
            .await
    }

    async fn clear(&self) -> std::result::Result<(), Status> {
        self.call("cleanup".into(), |s| s.cleanup()).await
    }

    type InfoStream = InfoStream;

    async fn list(
        &self,
        _snapshotter: String,
        filters: Vec<String>,
    ) -> std::result::Result<InfoStream, Status> {
        let infos = self
            .call(format!("list {filters:?}"), move |s| {
                let f = filter::Filters::parse(&filters)?;
                let mut v = Vec::new();
                for l in s.list()? {
                    let i = to_info(l);
                    if f.matches(&i) {
                        v.push(Ok(i));
                    }
                }
                Ok(v)
            })
            .await?;
        Ok(tokio_stream::iter(infos))
    }
}
