//! The store's own thread. SQLite calls block on the disk, so the daemon never makes them on a
//! tokio worker: it sends each operation to this thread and awaits the answer. One thread
//! serialises every write, which is also what SQLite wants.

use std::sync::mpsc;

use tokio::sync::oneshot;

use crate::storage::{Store, StoreError};

type Job = Box<dyn FnOnce(&Store) + Send>;

/// A handle on the store thread; cheap to clone. The thread ends when the last handle goes.
#[derive(Clone)]
pub struct StoreActor {
    jobs: mpsc::Sender<Job>,
}

impl StoreActor {
    /// Moves `store` onto a thread of its own.
    pub fn start(store: Store) -> Result<StoreActor, StoreError> {
        let (jobs, receiver) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("deploywatch-store".to_string())
            .spawn(move || {
                while let Ok(job) = receiver.recv() {
                    job(&store);
                }
            })
            .map_err(|e| StoreError::Corrupt(format!("cannot start the store thread: {e}")))?;
        Ok(StoreActor { jobs })
    }

    /// Queues `operation` on the store thread without waiting for it: it runs after every
    /// operation queued before this call, and before every one queued after it. A failure is
    /// logged.
    pub(crate) fn submit<F>(&self, what: &'static str, operation: F)
    where
        F: FnOnce(&Store) -> Result<(), StoreError> + Send + 'static,
    {
        let job = Box::new(move |store: &Store| {
            if let Err(error) = operation(store) {
                tracing::warn!(operation = what, %error, "state store operation failed");
            }
        });
        if self.jobs.send(job).is_err() {
            tracing::warn!(operation = what, "the state store thread has stopped");
        }
    }

    /// Runs `operation` on the store thread and waits (asynchronously) for its result.
    pub(crate) async fn run<R, F>(&self, operation: F) -> Result<R, StoreError>
    where
        R: Send + 'static,
        F: FnOnce(&Store) -> Result<R, StoreError> + Send + 'static,
    {
        let (reply, answer) = oneshot::channel();
        self.jobs
            .send(Box::new(move |store: &Store| {
                let _ = reply.send(operation(store));
            }))
            .map_err(|_| StoreError::Closed)?;
        answer.await.map_err(|_| StoreError::Closed)?
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::analysis::sample::Sample;

    #[tokio::test]
    async fn operations_run_on_the_store_thread() {
        let actor = StoreActor::start(Store::in_memory().expect("store")).expect("actor");
        let on = actor
            .run(move |store| {
                store.add_sample(
                    "t",
                    &Sample {
                        at: 5.0,
                        ..Sample::default()
                    },
                )?;
                Ok(std::thread::current().name().map(str::to_string))
            })
            .await
            .expect("run");
        assert_eq!(on.as_deref(), Some("deploywatch-store"));
        let n = actor
            .run(|store| store.sample_count("t", 0.0, 10.0))
            .await
            .expect("count");
        assert_eq!(n, 1);
    }
}
