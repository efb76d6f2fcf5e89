//! An object store that tests can stall, slow down, break and count: it wraps a real one,
//! so what goes through it is what a node published. Edge tests put it under an edge to show
//! that a store that never answers does not hold the poller, and that simultaneous misses
//! for one file cost the store one GET.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::stream::BoxStream;
use futures::StreamExt as _;
use object_store::path::Path;
use object_store::{
    GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore,
    PutMultipartOptions, PutOptions, PutPayload, PutResult,
};

/// See the module doc.
#[derive(Debug)]
pub struct ControlledStore {
    inner: Arc<dyn ObjectStore>,
    /// While true, every call waits (a store that accepts and never answers).
    stalled: tokio::sync::watch::Sender<bool>,
    /// Added to every GET.
    get_delay: Mutex<Duration>,
    /// GETs of a path containing this fail.
    fail_gets: Mutex<Option<String>>,
    /// GETs by path.
    gets: Mutex<HashMap<String, usize>>,
}

impl ControlledStore {
    pub fn new(inner: Arc<dyn ObjectStore>) -> ControlledStore {
        ControlledStore {
            inner,
            stalled: tokio::sync::watch::channel(false).0,
            get_delay: Mutex::new(Duration::ZERO),
            fail_gets: Mutex::new(None),
            gets: Mutex::default(),
        }
    }

    /// Stalls every call (`true`) until called with `false`.
    pub fn stall(&self, stalled: bool) {
        self.stalled.send_replace(stalled);
    }

    pub fn set_get_delay(&self, delay: Duration) {
        *self.get_delay.lock().unwrap() = delay;
    }

    /// Makes GETs of paths containing `part` fail (`None`: none fail).
    pub fn fail_gets(&self, part: Option<&str>) {
        *self.fail_gets.lock().unwrap() = part.map(str::to_string);
    }

    /// GETs of paths containing `part` so far.
    pub fn gets_of(&self, part: &str) -> usize {
        let gets = self.gets.lock().unwrap();
        gets.iter()
            .filter(|(path, _)| path.contains(part))
            .map(|(_, n)| n)
            .sum()
    }

    fn until_unstalled(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut stalled = self.stalled.subscribe();
        async move {
            let _ = stalled.wait_for(|s| !*s).await;
        }
    }
}

impl fmt::Display for ControlledStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ControlledStore({})", self.inner)
    }
}

#[async_trait::async_trait]
impl ObjectStore for ControlledStore {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> object_store::Result<PutResult> {
        self.until_unstalled().await;
        self.inner.put_opts(location, payload, opts).await
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: PutMultipartOptions,
    ) -> object_store::Result<Box<dyn MultipartUpload>> {
        self.until_unstalled().await;
        self.inner.put_multipart_opts(location, opts).await
    }

    async fn get_opts(
        &self,
        location: &Path,
        options: GetOptions,
    ) -> object_store::Result<GetResult> {
        *self
            .gets
            .lock()
            .unwrap()
            .entry(location.to_string())
            .or_default() += 1;
        self.until_unstalled().await;
        let delay = *self.get_delay.lock().unwrap();
        tokio::time::sleep(delay).await;
        let fail = self
            .fail_gets
            .lock()
            .unwrap()
            .as_ref()
            .is_some_and(|part| location.as_ref().contains(part.as_str()));
        if fail {
            return Err(object_store::Error::Generic {
                store: "controlled",
                source: format!("the test fails reads of {location}").into(),
            });
        }
        self.inner.get_opts(location, options).await
    }

    async fn delete(&self, location: &Path) -> object_store::Result<()> {
        self.until_unstalled().await;
        self.inner.delete(location).await
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        let wait = self.until_unstalled();
        let inner = self.inner.clone();
        let prefix = prefix.cloned();
        futures::stream::once(async move {
            wait.await;
            inner.list(prefix.as_ref())
        })
        .flatten()
        .boxed()
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> object_store::Result<ListResult> {
        self.until_unstalled().await;
        self.inner.list_with_delimiter(prefix).await
    }

    async fn copy(&self, from: &Path, to: &Path) -> object_store::Result<()> {
        self.until_unstalled().await;
        self.inner.copy(from, to).await
    }

    async fn copy_if_not_exists(&self, from: &Path, to: &Path) -> object_store::Result<()> {
        self.until_unstalled().await;
        self.inner.copy_if_not_exists(from, to).await
    }
}
